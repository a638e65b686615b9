//! TLS for HBONE: rustls configurations (TLS 1.3 only, ALPN `h2`, no SNI) and the certificate
//! verifiers that check chains against the mesh roots and SPIFFE identities in URI SANs.

use crate::identity::Identity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use std::sync::Arc;

/// ALPN protocol HBONE negotiates on both sides.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid root certificate: {0}")]
    BadRoot(String),
    #[error("certificate chain rejected: {0}")]
    Chain(String),
    #[error("certificate has no SPIFFE URI SAN")]
    NoIdentity,
    #[error("certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider everything here uses (ring: fast AES-GCM, lean to build).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The mesh trust anchors.
#[derive(Debug, Clone)]
pub struct TrustRoots {
    ders: Vec<CertificateDer<'static>>,
    anchors: Arc<Vec<TrustAnchor<'static>>>,
}

impl TrustRoots {
    pub fn new(ders: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        let anchors = ders
            .iter()
            .map(|d| {
                webpki::anchor_from_trusted_cert(d)
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsError::BadRoot(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if anchors.is_empty() {
            return Err(TlsError::BadRoot("no root certificates".into()));
        }
        Ok(TrustRoots {
            ders,
            anchors: Arc::new(anchors),
        })
    }

    pub fn ders(&self) -> &[CertificateDer<'static>] {
        &self.ders
    }
}

/// Verifies that `end_entity` chains to one of `roots` (through `intermediates`) now.
pub fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &TrustRoots,
) -> Result<(), TlsError> {
    let cert =
        webpki::EndEntityCert::try_from(end_entity).map_err(|e| TlsError::Chain(e.to_string()))?;
    let now = UnixTime::now();
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    // HBONE certificates are used for both ends; require the usage of neither so that peers
    // whose certs carry only one EKU (some CAs do) still interoperate.
    cert.verify_for_usage(
        algs.all,
        &roots.anchors,
        intermediates,
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .or_else(|_| {
        cert.verify_for_usage(
            algs.all,
            &roots.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
    })
    .map(|_| ())
    .map_err(|e| TlsError::Chain(format!("{e:?}")))
}

/// The SPIFFE identities in a certificate's URI SANs (entries that are not SPIFFE are skipped).
pub fn identities_of(cert: &CertificateDer<'_>) -> Result<Vec<Identity>, TlsError> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::Parse(e.to_string()))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Ok(id) = Identity::parse(uri) {
                    if uri.starts_with("spiffe://") {
                        out.push(id);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The first SPIFFE identity of a peer's leaf certificate.
pub fn peer_identity(chain: Option<&[CertificateDer<'_>]>) -> Result<Identity, TlsError> {
    let leaf = chain.and_then(|c| c.first()).ok_or(TlsError::NoIdentity)?;
    identities_of(leaf)?
        .into_iter()
        .next()
        .ok_or(TlsError::NoIdentity)
}

fn tls_err(e: TlsError) -> rustls::Error {
    rustls::Error::General(e.to_string())
}

/// Client side: the server must chain to the mesh roots and present one of `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: TrustRoots,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_chain(end_entity, intermediates, &self.roots).map_err(tls_err)?;
        let ids = identities_of(end_entity).map_err(tls_err)?;
        if ids.iter().any(|id| self.expected.contains(id)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server identity {} is not one of the expected [{}]",
                ids.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                self.expected
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server side: a client certificate is mandatory, must chain to the mesh roots and carry a
/// SPIFFE identity in one of `trust_domains`. Authorization happens later on that identity.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    roots: TrustRoots,
    trust_domains: Vec<String>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(end_entity, intermediates, &self.roots).map_err(tls_err)?;
        let ids = identities_of(end_entity).map_err(tls_err)?;
        if ids
            .iter()
            .any(|id| self.trust_domains.contains(&id.trust_domain))
        {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "client certificate has no SPIFFE identity in trust domain(s) {}",
                self.trust_domains.join(", ")
            )))
        }
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An HBONE client configuration presenting `chain`/`key` and accepting only `expected`.
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: &TrustRoots,
    expected: Vec<Identity>,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: roots.clone(),
        expected,
        provider: provider.clone(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    Ok(cfg)
}

/// An HBONE server configuration presenting `chain`/`key`, requiring a mesh client cert.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: &TrustRoots,
    trust_domains: Vec<String>,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeClientVerifier {
        roots: roots.clone(),
        trust_domains,
        provider: provider.clone(),
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

/// Read buffer under a TLS session. rustls reads at most one record (often 4 KiB) per call;
/// a large buffer below it turns those into one big socket read per wake-up.
pub const TRANSPORT_READ_BUFFER: usize = 256 * 1024;
/// How much encrypted data rustls may queue before a write waits for the socket; large, so
/// one `writev` carries many records.
pub const TLS_SEND_BUFFER_LIMIT: usize = 1024 * 1024;

/// Wraps a socket for use under rustls (see [`TRANSPORT_READ_BUFFER`]).
pub fn buffered<T: tokio::io::AsyncRead>(io: T) -> tokio::io::BufReader<T> {
    tokio::io::BufReader::with_capacity(TRANSPORT_READ_BUFFER, io)
}

/// The server name handed to rustls: an IP literal, which is never sent as SNI.
pub fn no_sni_name(ip: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::MeshCa;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn handshake(
        client: ClientConfig,
        server: ServerConfig,
    ) -> Result<Identity, Box<dyn std::error::Error>> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let srv = tokio::spawn(async move {
            let mut s = acceptor.accept(b).await?;
            let id = peer_identity(s.get_ref().1.peer_certificates())?;
            s.write_all(b"ok").await?;
            s.flush().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(id)
        });
        let mut c = connector
            .connect(no_sni_name([127, 0, 0, 1].into()), a)
            .await?;
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).await?;
        let id = srv.await?.map_err(|e| e.to_string())?;
        Ok(id)
    }

    fn certs(ca: &MeshCa, ns: &str, sa: &str) -> crate::identity::ca::IssuedCert {
        ca.issue(
            &Identity::new(ca.trust_domain(), ns, sa),
            Duration::from_secs(600),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn mutual_tls_extracts_client_identity() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let roots = TrustRoots::new(vec![ca.root_der().clone()]).unwrap();
        let c = certs(&ca, "default", "client");
        let s = certs(&ca, "default", "server");
        let client = client_config(c.chain, c.key, &roots, vec![s.identity.clone()]).unwrap();
        let server = server_config(s.chain, s.key, &roots, vec!["cluster.local".into()]).unwrap();
        let id = handshake(client, server).await.unwrap();
        assert_eq!(id, c.identity);
    }

    #[tokio::test]
    async fn client_rejects_unexpected_server_identity() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let roots = TrustRoots::new(vec![ca.root_der().clone()]).unwrap();
        let c = certs(&ca, "default", "client");
        let s = certs(&ca, "default", "server");
        let wrong = Identity::new("cluster.local", "default", "other");
        let client = client_config(c.chain, c.key, &roots, vec![wrong]).unwrap();
        let server = server_config(s.chain, s.key, &roots, vec!["cluster.local".into()]).unwrap();
        assert!(handshake(client, server).await.is_err());
    }

    #[tokio::test]
    async fn server_rejects_client_from_foreign_ca() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let other = MeshCa::generate("cluster.local").unwrap();
        let roots = TrustRoots::new(vec![ca.root_der().clone()]).unwrap();
        let other_roots = TrustRoots::new(vec![other.root_der().clone()]).unwrap();
        let c = certs(&other, "default", "client");
        let s = certs(&ca, "default", "server");
        // The client trusts the real server; the server must still refuse the foreign client.
        let client = client_config(c.chain, c.key, &roots, vec![s.identity.clone()]).unwrap();
        let server = server_config(s.chain, s.key, &roots, vec!["cluster.local".into()]).unwrap();
        assert!(handshake(client, server).await.is_err());
        drop(other_roots);
    }
}
