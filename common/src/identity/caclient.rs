//! The proxies' client of Istio's certificate service (cluster mode): a fresh ECDSA P-256 key
//! per request (it never leaves the process), a CSR with the identity's URI SAN,
//! `CreateCertificate` over TLS (server verified against a root file; bearer token re-read
//! before every request; `clusterid` and `CA_HEADER_*` headers; `ImpersonatedIdentity` when
//! asking on behalf of a workload), and validation of the answer: at least leaf + root bundle,
//! the leaf names exactly the requested identity, certifies our key, and chains to our roots.

use super::ca::{cert_ders, IssuedCert};
use super::csr;
use super::Identity;
use crate::tls::{self, TrustRoots};
use crate::xds::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::xds::ca::IstioCertificateRequest;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Istio's default token path (relative to the working directory, like Istio's proxies).
pub const DEFAULT_TOKEN_PATH: &str = "./var/run/secrets/tokens/istio-token";
/// Metadata key asking for another workload's identity.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("bad CA address {0:?}: {1}")]
    Address(String, String),
    #[error("CA root {0}: {1}")]
    Root(PathBuf, std::io::Error),
    #[error("CA transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("CA refused: {0}")]
    Rpc(#[from] tonic::Status),
    #[error(transparent)]
    Csr(#[from] csr::CsrError),
    #[error("CA answered an unusable chain: {0}")]
    BadChain(String),
}

/// Where and how to reach the certificate service.
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// `https://host:port` (`http://` only for tests).
    pub address: String,
    /// PEM file the server's certificate must chain to (Istio's `CA_ROOT_CA`).
    pub root_cert: Option<PathBuf>,
    /// Name the server certificate must carry when it is not the address's host
    /// (Istio's `ALT_CA_HOSTNAME`).
    pub server_name: Option<String>,
    /// Bearer token: a file read before every request, or a literal token when it names no
    /// file (Istio's `AUTH_TOKEN`). None: no authorization header.
    pub token: Option<String>,
    /// `clusterid` header.
    pub cluster_id: String,
    /// Extra headers (Istio's `CA_HEADER_<NAME>=value`).
    pub headers: Vec<(String, String)>,
    /// This proxy's own identity: requests for it carry no `ImpersonatedIdentity`. None: every
    /// request impersonates (ztunnel in Istio's shared mode).
    pub own_identity: Option<Identity>,
    /// Requested certificate lifetime.
    pub ttl: Duration,
}

impl CaClientConfig {
    /// Settings the way Istio's proxies read their environment: token from `AUTH_TOKEN`
    /// (else [`DEFAULT_TOKEN_PATH`] when it exists), `clusterid` from `ISTIO_META_CLUSTER_ID` /
    /// `CLUSTER_ID` (else `Kubernetes`), extra headers from `CA_HEADER_*`, server name from
    /// `ALT_CA_HOSTNAME`.
    pub fn from_env(address: String, root_cert: Option<PathBuf>, ttl: Duration) -> Self {
        let token = std::env::var("AUTH_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| {
                std::path::Path::new(DEFAULT_TOKEN_PATH)
                    .exists()
                    .then(|| DEFAULT_TOKEN_PATH.into())
            });
        let cluster_id = ["ISTIO_META_CLUSTER_ID", "CLUSTER_ID"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| "Kubernetes".into());
        let headers = std::env::vars()
            .filter_map(|(k, v)| {
                k.strip_prefix("CA_HEADER_")
                    .map(|n| (n.to_ascii_lowercase().replace('_', "-"), v))
            })
            .collect();
        CaClientConfig {
            address,
            root_cert,
            server_name: std::env::var("ALT_CA_HOSTNAME")
                .ok()
                .filter(|s| !s.is_empty()),
            token,
            cluster_id,
            headers,
            own_identity: None,
            ttl,
        }
    }

    fn token(&self) -> Option<String> {
        let t = self.token.as_ref()?;
        match std::fs::read_to_string(t) {
            Ok(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
            Err(_) if !t.contains('/') => Some(t.clone()),
            Err(e) => {
                tracing::warn!(file = %t, error = %e, "cannot read the CA token");
                None
            }
        }
    }
}

/// A connection (lazily established, re-established on failure) to the certificate service.
#[derive(Clone)]
pub struct CaClient {
    cfg: CaClientConfig,
    channel: Channel,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("address", &self.cfg.address)
            .finish_non_exhaustive()
    }
}

impl CaClient {
    /// Must be called inside a tokio runtime (the channel's worker runs there).
    pub fn new(cfg: CaClientConfig) -> Result<Self, CaClientError> {
        let addr = &cfg.address;
        let mut ep = Endpoint::from_shared(addr.clone())
            .map_err(|e| CaClientError::Address(addr.clone(), e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if addr.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(root) = &cfg.root_cert {
                let pem = std::fs::read(root).map_err(|e| CaClientError::Root(root.clone(), e))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(name) = &cfg.server_name {
                tls = tls.domain_name(name.clone());
            }
            ep = ep.tls_config(tls)?;
        }
        Ok(CaClient {
            channel: ep.connect_lazy(),
            cfg,
        })
    }

    pub fn config(&self) -> &CaClientConfig {
        &self.cfg
    }

    /// Obtains a certificate for `id`, validated against `roots`.
    pub async fn fetch(
        &self,
        id: &Identity,
        roots: &TrustRoots,
    ) -> Result<IssuedCert, CaClientError> {
        let new = csr::build(id)?;
        let mut metadata = prost_types::Struct::default();
        if self.cfg.own_identity.as_ref() != Some(id) {
            metadata.fields.insert(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                },
            );
        }
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: new.pem.clone(),
            validity_duration: self.cfg.ttl.as_secs().max(1) as i64,
            metadata: Some(metadata),
        });
        let md = req.metadata_mut();
        if let Some(t) = self.cfg.token() {
            if let Ok(v) = format!("Bearer {t}").parse() {
                md.insert("authorization", v);
            }
        }
        if let Ok(v) = self.cfg.cluster_id.parse() {
            md.insert("clusterid", v);
        }
        for (k, v) in &self.cfg.headers {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
                v.parse(),
            ) {
                md.insert(k, v);
            }
        }
        let resp = IstioCertificateServiceClient::new(self.channel.clone())
            .create_certificate(req)
            .await?
            .into_inner();
        issued_from_chain(id, &resp.cert_chain, new, roots)
    }
}

/// Istio's default root file (relative to the working directory).
pub const DEFAULT_ROOT_PATH: &str = "./var/run/secrets/istio/root-cert.pem";

/// How a proxy reaches the certificate service (its CLI's `--ca-address`, `--ca-root`,
/// `--token-file`).
#[derive(Debug, Clone)]
pub struct RemoteCa {
    pub address: String,
    /// Root bundle PEM file: verifies the CA server and, as the mesh roots, peers' certificates.
    pub root: Option<PathBuf>,
    /// Token file (or literal token); None: `AUTH_TOKEN`, else Istio's default path.
    pub token: Option<String>,
    /// The proxy's own identity (no impersonation for it); None: always impersonate.
    pub own_identity: Option<Identity>,
    pub ttl: Duration,
    pub trust_domain: String,
}

/// A cluster-mode [`CertStore`](super::store::CertStore) for `ca`. Must be called inside a
/// tokio runtime.
pub fn remote_store(
    ca: RemoteCa,
    opts: super::store::RemoteOptions,
) -> Result<super::store::CertStore, CaClientError> {
    let root = ca
        .root
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT_PATH));
    let pem = std::fs::read_to_string(&root).map_err(|e| CaClientError::Root(root.clone(), e))?;
    let roots = TrustRoots::new(cert_ders(&pem)).map_err(|e| {
        CaClientError::Root(
            root.clone(),
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        )
    })?;
    let mut cfg = CaClientConfig::from_env(ca.address, Some(root), ca.ttl);
    if ca.token.is_some() {
        cfg.token = ca.token;
    }
    cfg.own_identity = ca.own_identity;
    let client = CaClient::new(cfg)?;
    Ok(super::store::CertStore::remote(
        client,
        roots,
        &ca.trust_domain,
        opts,
    ))
}

/// Checks an answered chain and pairs it with our key.
fn issued_from_chain(
    id: &Identity,
    chain: &[String],
    new: csr::NewCsr,
    roots: &TrustRoots,
) -> Result<IssuedCert, CaClientError> {
    let bad = |s: String| CaClientError::BadChain(s);
    if chain.len() < 2 {
        return Err(bad("no root certificate present".into()));
    }
    let leaf = cert_ders(&chain[0])
        .into_iter()
        .next()
        .ok_or_else(|| bad("no leaf certificate".into()))?;
    let mut intermediates: Vec<CertificateDer<'static>> = Vec::new();
    for pem in &chain[1..chain.len() - 1] {
        intermediates.extend(cert_ders(pem));
    }
    if cert_ders(&chain[chain.len() - 1]).is_empty() {
        return Err(bad("empty root bundle".into()));
    }
    let ids = tls::identities_of(&leaf).map_err(|e| bad(e.to_string()))?;
    if ids != [id.clone()] {
        return Err(bad(format!("leaf names {ids:?}, requested {id}")));
    }
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| bad(e.to_string()))?;
    if parsed.tbs_certificate.subject_pki.raw != new.key.public_key_der().as_slice() {
        return Err(bad("leaf does not certify our key".into()));
    }
    tls::verify_chain(&leaf, &intermediates, roots).map_err(|e| bad(e.to_string()))?;
    let not_before = SystemTime::from(parsed.validity().not_before.to_datetime());
    let not_after = SystemTime::from(parsed.validity().not_after.to_datetime());
    let mut chain_pem = String::new();
    for c in std::iter::once(&leaf).chain(&intermediates) {
        chain_pem.push_str(&super::ca::pem_of(c));
    }
    let mut full = vec![leaf];
    full.extend(intermediates);
    Ok(IssuedCert {
        identity: id.clone(),
        chain: full,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(new.key.serialize_der())),
        chain_pem,
        key_pem: new.key.serialize_pem(),
        not_before,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::MeshCa;

    fn answer(ca: &MeshCa, csr_pem: &str, id: &Identity) -> Vec<String> {
        let v = csr::verify(csr_pem).unwrap();
        ca.sign_public_key(&v.public_key, id, Duration::from_secs(600))
            .unwrap()
            .cert_chain
    }

    #[test]
    fn valid_answer_becomes_a_usable_cert_and_bad_ones_are_refused() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let roots = TrustRoots::new(vec![ca.root_der().clone()]).unwrap();
        let id = Identity::new("cluster.local", "ns", "sa");
        let new = csr::build(&id).unwrap();
        let chain = answer(&ca, &new.pem, &id);
        let issued = issued_from_chain(&id, &chain, new, &roots).unwrap();
        assert_eq!(issued.chain.len(), 1);
        assert!(issued.not_after > SystemTime::now() + Duration::from_secs(500));

        // Leaf only: Istio's proxies refuse it too.
        let new = csr::build(&id).unwrap();
        let chain = answer(&ca, &new.pem, &id);
        let err = issued_from_chain(&id, &chain[..1], new, &roots).unwrap_err();
        assert!(err.to_string().contains("no root"), "{err}");

        // Another identity than asked for.
        let other = Identity::new("cluster.local", "ns", "other");
        let new = csr::build(&id).unwrap();
        let chain = answer(&ca, &new.pem, &other);
        assert!(issued_from_chain(&id, &chain, new, &roots).is_err());

        // A cert for somebody else's key.
        let new = csr::build(&id).unwrap();
        let foreign = csr::build(&id).unwrap();
        let chain = answer(&ca, &foreign.pem, &id);
        let err = issued_from_chain(&id, &chain, new, &roots).unwrap_err();
        assert!(err.to_string().contains("our key"), "{err}");

        // Signed by a CA we do not trust.
        let rogue = MeshCa::generate("cluster.local").unwrap();
        let new = csr::build(&id).unwrap();
        let chain = answer(&rogue, &new.pem, &id);
        assert!(issued_from_chain(&id, &chain, new, &roots).is_err());
    }
}
