//! Per-workload certificates, cached with their ready-made TLS configurations and renewed at
//! half-life. Two sources: the local mesh CA (standalone mode: minted synchronously on first
//! use) or the control plane's certificate service (cluster mode: fetched asynchronously,
//! prefetched for the node's workloads, single-flight per identity; a failed renewal keeps the
//! still-valid certificate and retries with exponential backoff; a connection for an identity
//! with no certificate yet waits for the fetch up to a deadline). Live connections keep the
//! configuration they were established with, so rotation never breaks them.

use super::ca::{CaError, IssuedCert, MeshCa};
use super::caclient::CaClient;
use super::Identity;
use crate::tls::{self, TlsError, TrustRoots};
use rustls::{ClientConfig, ServerConfig};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("certificate for {0} is being fetched")]
    Pending(Identity),
    #[error("no certificate for {0}: {1}")]
    Fetch(Identity, String),
}

/// A workload's current certificate and the server configuration presenting it.
#[derive(Debug)]
pub struct WorkloadCert {
    pub issued: IssuedCert,
    pub server_config: Arc<ServerConfig>,
    /// Increases every time this identity's certificate is replaced.
    pub generation: u64,
}

impl WorkloadCert {
    /// True once more than half of the certificate's lifetime has passed.
    pub fn needs_rotation(&self, now: SystemTime) -> bool {
        let total = self
            .issued
            .not_after
            .duration_since(self.issued.not_before)
            .unwrap_or_default();
        match now.duration_since(self.issued.not_before) {
            Ok(age) => age >= total / 2,
            Err(_) => false,
        }
    }

    /// True while the certificate is still within its validity period.
    pub fn is_valid(&self, now: SystemTime) -> bool {
        now < self.issued.not_after
    }

    /// A client configuration presenting this certificate and accepting only `expected`.
    pub fn client_config(
        &self,
        roots: &TrustRoots,
        expected: Vec<Identity>,
    ) -> Result<ClientConfig, TlsError> {
        tls::client_config(
            self.issued.chain.clone(),
            self.issued.key.clone_key(),
            roots,
            expected,
        )
    }
}

/// Cluster-mode settings.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// How long a connection waits for a certificate being fetched.
    pub wait: Duration,
    /// First retry delay after a failed fetch (doubles up to `max_backoff`).
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            wait: Duration::from_secs(5),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// The outcome of the latest fetch attempt for an identity (None: none finished yet).
type Attempt = Option<Result<(), String>>;

struct Remote {
    client: CaClient,
    runtime: tokio::runtime::Handle,
    opts: RemoteOptions,
    /// Identities with a fetch loop running, and the channel its attempts are announced on.
    inflight: Mutex<HashMap<Identity, watch::Receiver<Attempt>>>,
    /// Identities forgotten by `rotate_due` while a fetch loop ran: the loop stops retrying.
    forgotten: Mutex<HashSet<Identity>>,
}

enum Source {
    Local(Box<MeshCa>),
    Remote(Box<Remote>),
}

struct Inner {
    source: Source,
    roots: TrustRoots,
    trust_domain: String,
    ttl: Duration,
    certs: RwLock<HashMap<Identity, Arc<WorkloadCert>>>,
    generation: AtomicU64,
}

/// Obtains and caches certificates for the identities this proxy serves.
pub struct CertStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("ttl", &self.inner.ttl)
            .field(
                "mode",
                &match self.inner.source {
                    Source::Local(_) => "local",
                    Source::Remote(_) => "remote",
                },
            )
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// Standalone mode: certificates minted by the local mesh CA.
    pub fn new(ca: MeshCa, ttl: Duration) -> Result<Self, CertError> {
        let roots = TrustRoots::new(ca.root_ders().to_vec())?;
        let trust_domain = ca.trust_domain().to_string();
        Ok(CertStore {
            inner: Arc::new(Inner {
                source: Source::Local(Box::new(ca)),
                roots,
                trust_domain,
                ttl,
                certs: RwLock::new(HashMap::new()),
                generation: 0.into(),
            }),
        })
    }

    /// Cluster mode: certificates fetched from the certificate service through `client`
    /// (whose config sets the requested lifetime), verified against the mesh `roots`. Must be
    /// called inside a tokio runtime: fetches run on it.
    pub fn remote(
        client: CaClient,
        roots: TrustRoots,
        trust_domain: &str,
        opts: RemoteOptions,
    ) -> Self {
        let ttl = client.config().ttl;
        CertStore {
            inner: Arc::new(Inner {
                source: Source::Remote(Box::new(Remote {
                    client,
                    runtime: tokio::runtime::Handle::current(),
                    opts,
                    inflight: Mutex::new(HashMap::new()),
                    forgotten: Mutex::new(HashSet::new()),
                })),
                roots,
                trust_domain: trust_domain.to_string(),
                ttl,
                certs: RwLock::new(HashMap::new()),
                generation: 0.into(),
            }),
        }
    }

    pub fn roots(&self) -> &TrustRoots {
        &self.inner.roots
    }

    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }

    /// True when certificates come from the control plane.
    pub fn is_remote(&self) -> bool {
        matches!(self.inner.source, Source::Remote(_))
    }

    /// The current certificate for `id`, without waiting. Standalone: minted if there is none
    /// or it is due. Cluster: the cached certificate while valid (a renewal starts in the
    /// background once it is due); with none, a fetch starts and `Pending` is returned.
    pub fn get(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let now = SystemTime::now();
        let cached = self.inner.read().get(id).cloned();
        match &self.inner.source {
            Source::Local(ca) => match cached {
                Some(c) if !c.needs_rotation(now) => Ok(c),
                _ => self.inner.mint(ca, id),
            },
            Source::Remote(_) => match cached {
                Some(c) if c.is_valid(now) => {
                    if c.needs_rotation(now) {
                        self.start_fetch(id);
                    }
                    Ok(c)
                }
                _ => {
                    self.start_fetch(id);
                    Err(CertError::Pending(id.clone()))
                }
            },
        }
    }

    /// Like [`get`](Self::get), but in cluster mode waits (up to the configured deadline) for
    /// a certificate being fetched instead of failing at once.
    pub async fn get_wait(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        match self.get(id) {
            Err(CertError::Pending(_)) => {}
            other => return other,
        }
        let Source::Remote(remote) = &self.inner.source else {
            return self.get(id);
        };
        let mut rx = self.start_fetch(id);
        let deadline = tokio::time::Instant::now() + remote.opts.wait;
        let mut last_error = None;
        loop {
            if let Some(c) = self.usable(id) {
                return Ok(c);
            }
            if let Some(Err(e)) = &*rx.borrow_and_update() {
                last_error = Some(e.clone());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                // The fetch loop ended: it either installed a certificate or gave up.
                Ok(Err(_)) => {
                    return self.usable(id).ok_or_else(|| {
                        CertError::Fetch(
                            id.clone(),
                            last_error.unwrap_or_else(|| "fetch abandoned".into()),
                        )
                    })
                }
                Err(_) => {
                    return Err(CertError::Fetch(
                        id.clone(),
                        last_error
                            .unwrap_or_else(|| format!("not issued within {:?}", remote.opts.wait)),
                    ))
                }
            }
        }
    }

    fn usable(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        self.inner
            .read()
            .get(id)
            .filter(|c| c.is_valid(SystemTime::now()))
            .cloned()
    }

    /// Starts fetching `id` unless a fetch is already running (single flight); returns the
    /// channel its attempts are announced on. Standalone mode: a closed channel.
    fn start_fetch(&self, id: &Identity) -> watch::Receiver<Attempt> {
        let Source::Remote(remote) = &self.inner.source else {
            return watch::channel(None).1;
        };
        let mut inflight = remote.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = inflight.get(id) {
            return rx.clone();
        }
        remote
            .forgotten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let (tx, rx) = watch::channel(None);
        inflight.insert(id.clone(), rx.clone());
        drop(inflight);
        let inner = self.inner.clone();
        let id = id.clone();
        remote.runtime.spawn(fetch_loop(inner, id, tx));
        rx
    }

    /// Starts fetching every identity in `ids` that has no valid certificate yet (cluster
    /// mode; standalone mode mints them now). Never waits.
    pub fn prefetch(&self, ids: &[Identity]) {
        for id in ids {
            match self.get(id) {
                Ok(_) | Err(CertError::Pending(_)) => {}
                Err(e) => tracing::error!(identity = %id, error = %e, "cannot issue certificate"),
            }
        }
    }

    /// Renews every certificate past half its lifetime; forgets identities not in `keep`.
    /// Standalone: renewed now, returns how many. Cluster: renewals start in the background
    /// (the old certificate serves until the new one is installed), returns how many started.
    pub fn rotate_due(&self, keep: &[Identity]) -> usize {
        let now = SystemTime::now();
        let due: Vec<Identity> = {
            let mut map = self.inner.certs.write().unwrap_or_else(|p| p.into_inner());
            map.retain(|id, _| keep.contains(id));
            map.iter()
                .filter(|(_, c)| c.needs_rotation(now))
                .map(|(id, _)| id.clone())
                .collect()
        };
        if let Source::Remote(remote) = &self.inner.source {
            let inflight = remote.inflight.lock().unwrap_or_else(|p| p.into_inner());
            let mut forgotten = remote.forgotten.lock().unwrap_or_else(|p| p.into_inner());
            for id in inflight.keys().filter(|id| !keep.contains(id)) {
                forgotten.insert(id.clone());
            }
        }
        let mut n = 0;
        for id in due {
            match &self.inner.source {
                Source::Local(ca) => match self.inner.mint(ca, &id) {
                    Ok(_) => n += 1,
                    Err(e) => {
                        tracing::error!(identity = %id, error = %e, "certificate rotation failed")
                    }
                },
                Source::Remote(_) => {
                    self.start_fetch(&id);
                    n += 1;
                }
            }
        }
        n
    }

    /// Identities with a cached certificate and their expiry (for `/config_dump`).
    pub fn summary(&self) -> Vec<(Identity, SystemTime, u64)> {
        let mut v: Vec<_> = self
            .inner
            .read()
            .iter()
            .map(|(id, c)| (id.clone(), c.issued.not_after, c.generation))
            .collect();
        v.sort();
        v
    }

    /// Per identity, the expiry of its current certificate in seconds since the Unix epoch
    /// (Istio's `istio_cert_expiry_seconds`-style gauge; proxies' metrics read this).
    pub fn cert_expiry_seconds(&self) -> Vec<(Identity, u64)> {
        self.summary()
            .into_iter()
            .map(|(id, not_after, _)| {
                let secs = not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                (id, secs)
            })
            .collect()
    }
}

impl Inner {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Identity, Arc<WorkloadCert>>> {
        self.certs.read().unwrap_or_else(|p| p.into_inner())
    }

    fn mint(&self, ca: &MeshCa, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let issued = ca.issue(id, self.ttl)?;
        self.install(issued)
    }

    fn install(&self, issued: IssuedCert) -> Result<Arc<WorkloadCert>, CertError> {
        let server_config = Arc::new(tls::server_config(
            issued.chain.clone(),
            issued.key.clone_key(),
            &self.roots,
            vec![self.trust_domain.clone()],
        )?);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let id = issued.identity.clone();
        let cert = Arc::new(WorkloadCert {
            issued,
            server_config,
            generation,
        });
        self.certs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), cert.clone());
        tracing::info!(identity = %id, generation, "installed workload certificate");
        Ok(cert)
    }
}

/// Fetches `id` until it succeeds or the identity is forgotten, backing off exponentially
/// between failures and announcing every attempt on `tx`.
async fn fetch_loop(inner: Arc<Inner>, id: Identity, tx: watch::Sender<Attempt>) {
    let Source::Remote(remote) = &inner.source else {
        return;
    };
    let mut backoff = remote.opts.min_backoff;
    loop {
        let outcome = match remote.client.fetch(&id, &inner.roots).await {
            Ok(issued) => inner.install(issued).map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let failed = outcome.is_err();
        if let Err(e) = &outcome {
            let keeps = inner
                .read()
                .get(&id)
                .is_some_and(|c| c.is_valid(SystemTime::now()));
            tracing::warn!(identity = %id, error = %e, retry_in = ?backoff, keeps_valid_certificate = keeps, "certificate fetch failed");
        }
        tx.send_replace(Some(outcome));
        let forgotten = remote
            .forgotten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id);
        if !failed || forgotten {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(remote.opts.max_backoff);
    }
    remote
        .inflight
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    remote
        .forgotten
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_until_half_life_then_rotates() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let store = CertStore::new(ca, Duration::from_secs(3600)).unwrap();
        let id = Identity::new("cluster.local", "default", "a");
        let first = store.get(&id).unwrap();
        let again = store.get(&id).unwrap();
        assert_eq!(first.generation, again.generation);
        assert!(!first.needs_rotation(SystemTime::now()));
        assert!(first.needs_rotation(SystemTime::now() + Duration::from_secs(1900)));
        assert_eq!(store.rotate_due(std::slice::from_ref(&id)), 0);
        assert_eq!(store.summary().len(), 1);
        assert_eq!(store.rotate_due(&[]), 0);
        assert!(store.summary().is_empty());
    }

    #[test]
    fn short_ttl_certificates_are_reissued() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let store = CertStore::new(ca, Duration::from_millis(400)).unwrap();
        let id = Identity::new("cluster.local", "default", "a");
        let a = store.get(&id).unwrap();
        // A fresh short-lived certificate is not due yet: it is reused.
        assert_eq!(store.get(&id).unwrap().generation, a.generation);
        assert_eq!(store.rotate_due(std::slice::from_ref(&id)), 0);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(store.rotate_due(std::slice::from_ref(&id)), 1);
        let b = store.get(&id).unwrap();
        assert!(b.generation > a.generation);
    }
}
