//! The controller's own TLS serving certificate for its gRPC port (xDS + CA): issued by the
//! mesh CA for the controller Service's DNS names (and any extra names or IPs), so proxies
//! verify it with the root they already trust, and re-issued at half its lifetime without a
//! restart (a rustls certificate resolver whose key is swapped in place).

use arc_swap::ArcSwap;
use common::identity::ca::MeshCa;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::sync::Arc;
use std::time::Duration;

/// Errors building the serving certificate.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("issuing the serving certificate: {0}")]
    Issue(#[from] common::identity::ca::CaError),
    #[error("serving certificate PEM: {0}")]
    Pem(String),
    #[error("serving key: {0}")]
    Key(#[from] rustls::Error),
}

/// Resolves every handshake to the current serving certificate.
#[derive(Debug)]
pub struct ServingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn issue(ca: &MeshCa, names: &[String], ttl: Duration) -> Result<CertifiedKey, ServingError> {
    let (chain_pem, key_pem) = ca.issue_server(names, ttl)?;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServingError::Pem(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| ServingError::Pem(e.to_string()))?;
    Ok(CertifiedKey::new(chain, any_supported_type(&key)?))
}

/// How long after a CA change the serving certificate moves to the new CA: time for the
/// root ConfigMaps, and the kubelet's copies of them in the proxies' pods, to carry the new root.
pub const ROOT_PROPAGATION: Duration = Duration::from_secs(300);

impl ServingCert {
    /// Issues the first certificate for `names` (DNS names or IP addresses) valid for `ttl`.
    pub fn new(ca: &MeshCa, names: &[String], ttl: Duration) -> Result<Arc<Self>, ServingError> {
        Ok(Arc::new(ServingCert {
            current: ArcSwap::from_pointee(issue(ca, names, ttl)?),
        }))
    }

    /// Re-issues at half of `ttl`, forever (retrying a failure after a minute).
    pub fn spawn_rotation(self: &Arc<Self>, ca: Arc<MeshCa>, names: Vec<String>, ttl: Duration) {
        self.spawn_rotation_following(
            tokio::sync::watch::channel(ca).1,
            names,
            ttl,
            ROOT_PROPAGATION,
        )
    }

    /// [`ServingCert::spawn_rotation`] with the latest CA `ca` holds. After a CA change the
    /// certificate is re-issued by the new CA `propagation` later ([`ROOT_PROPAGATION`]; not
    /// at once: proxies
    /// must first see the new root in their mounted bundle; the replaced root stays in the
    /// bundle far longer, see [`crate::ca::follow`]).
    pub fn spawn_rotation_following(
        self: &Arc<Self>,
        mut ca: tokio::sync::watch::Receiver<Arc<MeshCa>>,
        names: Vec<String>,
        ttl: Duration,
        propagation: Duration,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut wait = ttl / 2;
            let mut ca_open = true;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    r = ca.changed(), if ca_open => {
                        if r.is_err() {
                            ca_open = false;
                        } else {
                            wait = propagation.min(ttl / 2);
                        }
                        continue;
                    }
                }
                let current = ca.borrow_and_update().clone();
                match issue(&current, &names, ttl) {
                    Ok(k) => {
                        me.current.store(Arc::new(k));
                        tracing::info!("serving certificate renewed");
                        wait = ttl / 2;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "renewing the serving certificate");
                        wait = Duration::from_secs(60).min(ttl / 4);
                    }
                }
            }
        });
    }

    /// A TLS 1.3 server configuration presenting this certificate (ALPN is set by the server).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, ServingError> {
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        Ok(Arc::new(cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::identity::ca::MeshCa;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    fn issuer_is(serving: &ServingCert, ca: &MeshCa) -> bool {
        let key = serving.current.load_full();
        let Some(leaf) = key.cert.first() else {
            return false;
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
            return false;
        };
        let Ok((_, root)) = x509_parser::parse_x509_certificate(ca.root_der().as_ref()) else {
            return false;
        };
        cert.verify_signature(Some(root.public_key())).is_ok()
    }

    #[tokio::test]
    async fn serving_certificate_moves_to_a_new_ca_after_the_propagation_delay() {
        let a = Arc::new(MeshCa::generate("cluster.local").unwrap());
        let b = Arc::new(MeshCa::generate("cluster.local").unwrap());
        let names = vec!["localhost".to_string()];
        let ttl = Duration::from_secs(3600);
        let serving = ServingCert::new(&a, &names, ttl).unwrap();
        let (tx, rx) = tokio::sync::watch::channel(a.clone());
        serving.spawn_rotation_following(rx, names, ttl, Duration::from_millis(300));
        assert!(issuer_is(&serving, &a));
        tx.send_replace(b.clone());
        // Not at once: proxies need the new root first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            issuer_is(&serving, &a),
            "still the old CA right after the change"
        );
        let start = std::time::Instant::now();
        while !issuer_is(&serving, &b) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "never moved to the new CA"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Istio's ztunnel checks the control plane's certificate with rustls' webpki verification:
    /// chain to `XDS_ROOT_CA`/`CA_ROOT_CA`, and the host of `XDS_ADDRESS` (a DNS name or an IP
    /// address: `https://10.0.0.1:15012` needs an IP SAN) or `ALT_XDS_HOSTNAME`. Its
    /// chart's default address is `istiod.istio-system.svc`, always among the names.
    #[test]
    fn serving_certificate_verifies_for_istiod_and_extra_ip_names() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let names = crate::ca::serving_names(
            "ambient-controller",
            "ambient-system",
            &["10.0.0.1".to_string()],
        );
        let serving = ServingCert::new(&ca, &names, Duration::from_secs(3600)).unwrap();
        let key = serving.current.load_full();
        let (leaf, rest) = key.cert.split_first().unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.root_der().clone()).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let check = |host: &str| {
            verifier.verify_server_cert(
                leaf,
                rest,
                &ServerName::try_from(host.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
        };
        for ok in [
            "10.0.0.1",
            "istiod.istio-system.svc",
            "istiod.istio-system.svc.cluster.local",
            "ambient-controller.ambient-system.svc",
        ] {
            check(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["10.0.0.2", "istiod-canary.istio-system.svc", "evil"] {
            assert!(check(bad).is_err(), "{bad} must not verify");
        }
    }
}
