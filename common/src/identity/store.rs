//! Per-workload certificates: minted on demand from the mesh CA, cached with their ready-made
//! TLS configurations, and rotated before expiry. Live connections keep the configuration they
//! were established with, so rotation never breaks them.

use super::ca::{CaError, IssuedCert, MeshCa};
use super::Identity;
use crate::tls::{self, TlsError, TrustRoots};
use rustls::{ClientConfig, ServerConfig};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
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

/// Mints and caches certificates for the identities this proxy serves.
pub struct CertStore {
    ca: MeshCa,
    roots: TrustRoots,
    ttl: Duration,
    certs: RwLock<HashMap<Identity, Arc<WorkloadCert>>>,
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    pub fn new(ca: MeshCa, ttl: Duration) -> Result<Self, CertError> {
        let roots = TrustRoots::new(vec![ca.root_der().clone()])?;
        Ok(CertStore {
            ca,
            roots,
            ttl,
            certs: RwLock::new(HashMap::new()),
            generation: 0.into(),
        })
    }

    pub fn roots(&self) -> &TrustRoots {
        &self.roots
    }

    pub fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    /// The current certificate for `id`, minting one if there is none or it is due.
    pub fn get(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        if let Some(c) = self.read().get(id) {
            if !c.needs_rotation(SystemTime::now()) {
                return Ok(c.clone());
            }
        }
        self.mint(id)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Identity, Arc<WorkloadCert>>> {
        self.certs.read().unwrap_or_else(|p| p.into_inner())
    }

    fn mint(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let issued = self.ca.issue(id, self.ttl)?;
        let server_config = Arc::new(tls::server_config(
            issued.chain.clone(),
            issued.key.clone_key(),
            &self.roots,
            vec![self.ca.trust_domain().to_string()],
        )?);
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let cert = Arc::new(WorkloadCert {
            issued,
            server_config,
            generation,
        });
        self.certs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), cert.clone());
        tracing::info!(identity = %id, generation, "issued workload certificate");
        Ok(cert)
    }

    /// Replaces every certificate past half its lifetime; forgets identities not in `keep`.
    /// Returns how many were rotated.
    pub fn rotate_due(&self, keep: &[Identity]) -> usize {
        let now = SystemTime::now();
        let due: Vec<Identity> = {
            let mut map = self.certs.write().unwrap_or_else(|p| p.into_inner());
            map.retain(|id, _| keep.contains(id));
            map.iter()
                .filter(|(_, c)| c.needs_rotation(now))
                .map(|(id, _)| id.clone())
                .collect()
        };
        let mut n = 0;
        for id in due {
            match self.mint(&id) {
                Ok(_) => n += 1,
                Err(e) => {
                    tracing::error!(identity = %id, error = %e, "certificate rotation failed")
                }
            }
        }
        n
    }

    /// Identities with a cached certificate and their expiry (for `/config_dump`).
    pub fn summary(&self) -> Vec<(Identity, SystemTime, u64)> {
        let mut v: Vec<_> = self
            .read()
            .iter()
            .map(|(id, c)| (id.clone(), c.issued.not_after, c.generation))
            .collect();
        v.sort();
        v
    }
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
