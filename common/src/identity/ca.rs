//! The mesh CA: a signing certificate and key (a self-signed root, or an intermediate signed by
//! an external root, as Istio's plug-in CA files lay them out), minting of short-lived SPIFFE
//! leaf certificates (standalone mode: key generated here) and signing of CSRs (cluster mode:
//! the controller signs the key a proxy generated). Leaves have an empty subject and a critical
//! URI SAN (RFC 5280 §4.2.1.6).

use super::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// File names inside a CA directory (the same names Istio's plug-in CA uses).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Plug-in CA names: the signing certificate and key, and the chain from it up to the root.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a usable {what}: {detail}")]
    BadPem {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid identity for a certificate: {0}")]
    Identity(String),
    #[error("invalid CA material: {0}")]
    Material(String),
}

/// A leaf signed from a CSR, in the wire form of Istio's certificate service: leaf PEM first,
/// then one intermediate per element, then the root bundle (all roots in one PEM) last.
#[derive(Debug, Clone)]
pub struct SignedChain {
    pub cert_chain: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A freshly minted leaf certificate with its chain (leaf first, then the root) and key.
#[derive(Debug)]
pub struct IssuedCert {
    pub identity: Identity,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub chain_pem: String,
    pub key_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The mesh CA: signs workload certificates.
pub struct MeshCa {
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// The trusted roots (first = the one `root_der` returns).
    root_ders: Vec<CertificateDer<'static>>,
    /// All roots as one PEM text (Istio's `root-cert.pem`).
    root_pem: String,
    /// Certificates between a leaf and the roots, signing certificate first, one PEM each
    /// (empty when the signing certificate is itself the root).
    intermediates: Vec<(CertificateDer<'static>, String)>,
    trust_domain: String,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    /// Creates a new self-signed root for `trust_domain`, valid for ten years.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, root_common_name(trust_domain));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let root_pem = cert.pem();
        let root_der = cert.der().clone();
        Ok(MeshCa {
            issuer: cert,
            key,
            root_ders: vec![root_der],
            root_pem,
            intermediates: Vec::new(),
            trust_domain: trust_domain.to_string(),
        })
    }

    /// A CA from Istio's plug-in material: the signing certificate and its key, optionally the
    /// root bundle (`root-cert.pem`; absent = the signing certificate is the root) and the
    /// chain from the signing certificate up to the root (`cert-chain.pem`). With an
    /// intermediate and no chain, the intermediate alone sits between leaf and root.
    pub fn from_plugin_pems(
        trust_domain: &str,
        ca_cert_pem: &str,
        ca_key_pem: &str,
        root_cert_pem: Option<&str>,
        cert_chain_pem: Option<&str>,
    ) -> Result<Self, CaError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| CaError::Material(format!("{what}: {e}"));
        let key = KeyPair::from_pem(ca_key_pem).map_err(|e| bad(CA_KEY_FILE, &e))?;
        let ca_der = first_cert_der(ca_cert_pem)
            .ok_or_else(|| bad(CA_CERT_FILE, &"no CERTIFICATE block"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(ca_der.as_ref())
            .map_err(|e| bad(CA_CERT_FILE, &e))?;
        if parsed.tbs_certificate.subject_pki.raw != key.public_key_der().as_slice() {
            return Err(bad(
                CA_KEY_FILE,
                &"does not match the CA certificate's public key",
            ));
        }
        let params =
            CertificateParams::from_ca_cert_pem(ca_cert_pem).map_err(|e| bad(CA_CERT_FILE, &e))?;
        let issuer = params
            .self_signed(&key)
            .map_err(|e| bad(CA_CERT_FILE, &e))?;
        let root_pem = match root_cert_pem {
            Some(r) if !r.trim().is_empty() => normalize_pem(r),
            _ => pem_of(&ca_der),
        };
        let root_ders = cert_ders(&root_pem);
        if root_ders.is_empty() {
            return Err(bad(ROOT_CERT_FILE, &"no CERTIFICATE block"));
        }
        let is_root = |d: &CertificateDer<'_>| root_ders.iter().any(|r| r == d);
        let mut intermediates: Vec<(CertificateDer<'static>, String)> = Vec::new();
        if !is_root(&ca_der) {
            intermediates.push((ca_der.clone(), pem_of(&ca_der)));
        }
        for d in cert_chain_pem.map(cert_ders).unwrap_or_default() {
            if !is_root(&d) && !intermediates.iter().any(|(i, _)| *i == d) {
                let pem = pem_of(&d);
                intermediates.push((d, pem));
            }
        }
        Ok(MeshCa {
            issuer,
            key,
            root_ders,
            root_pem,
            intermediates,
            trust_domain: trust_domain.to_string(),
        })
    }

    /// The signing certificate (PEM) and key (PKCS#8 PEM), e.g. to store in a Secret.
    pub fn signing_pems(&self) -> (String, String) {
        (self.issuer_pem(), self.key.serialize_pem())
    }

    fn issuer_pem(&self) -> String {
        match self.intermediates.first() {
            Some((_, pem)) => pem.clone(),
            None => self.root_pem.clone(),
        }
    }

    /// Loads the CA files in `dir`: Istio's plug-in set (`ca-cert.pem`, `ca-key.pem`, and
    /// optionally `root-cert.pem`, `cert-chain.pem`) when `ca-key.pem` is there, else a root
    /// and its key (`root-cert.pem`, `root-key.pem`).
    ///
    /// The trust domain is `trust_domain` when given. Otherwise it is the organisation of a
    /// root this mesh generated (`O=<trust domain>`, `CN=<trust domain> mesh root CA`), and
    /// Istio's default `cluster.local` for any other CA: a foreign root's `O=` (Istio's sample
    /// roots say `O=Istio`) is not a trust domain.
    pub fn load_with(dir: &Path, trust_domain: Option<&str>) -> Result<Self, CaError> {
        let key_path = dir.join(CA_KEY_FILE);
        if !key_path.exists() {
            let mut ca = MeshCa::load(dir)?;
            if let Some(td) = trust_domain {
                ca.trust_domain = td.to_string();
            }
            return Ok(ca);
        }
        let optional = |name: &str| -> Result<Option<String>, CaError> {
            let path = dir.join(name);
            if path.exists() {
                read(&path).map(Some)
            } else {
                Ok(None)
            }
        };
        let ca_cert = read(&dir.join(CA_CERT_FILE))?;
        let ca_key = read(&key_path)?;
        let root = optional(ROOT_CERT_FILE)?;
        let chain = optional(CERT_CHAIN_FILE)?;
        MeshCa::from_plugin_pems(
            trust_domain.unwrap_or(super::DEFAULT_TRUST_DOMAIN),
            &ca_cert,
            &ca_key,
            root.as_deref(),
            chain.as_deref(),
        )
        .map_err(|e| match e {
            CaError::Material(m) => CaError::Material(format!("{}: {m}", dir.display())),
            other => other,
        })
    }

    /// Loads `root-cert.pem` and `root-key.pem` from `dir` (trust domain as [`MeshCa::load_with`]
    /// without an explicit one).
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadPem {
            path: key_path.clone(),
            what: "private key",
            detail: e.to_string(),
        })?;
        let params =
            CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|e| CaError::BadPem {
                path: cert_path.clone(),
                what: "CA certificate",
                detail: e.to_string(),
            })?;
        let root_der = first_cert_der(&cert_pem).ok_or_else(|| CaError::BadPem {
            path: cert_path.clone(),
            what: "CA certificate",
            detail: "no CERTIFICATE block".into(),
        })?;
        let dn = |t: DnType| params.distinguished_name.get(&t).and_then(dn_value_string);
        let trust_domain = match (dn(DnType::OrganizationName), dn(DnType::CommonName)) {
            (Some(o), Some(cn)) if cn == root_common_name(&o) => o,
            _ => super::DEFAULT_TRUST_DOMAIN.to_string(),
        };
        // rcgen needs an issuer `Certificate`; re-signing the parsed params with the same key
        // yields the same subject and key, which is all a signature chain depends on.
        let issuer = params.self_signed(&key).map_err(|e| CaError::BadPem {
            path: key_path,
            what: "CA key matching the certificate",
            detail: e.to_string(),
        })?;
        Ok(MeshCa {
            issuer,
            key,
            root_ders: vec![root_der],
            root_pem: cert_pem,
            intermediates: Vec::new(),
            trust_domain,
        })
    }

    /// Writes the root certificate and key into `dir` (key file mode 0600).
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let cert_path = dir.join(ROOT_CERT_FILE);
        std::fs::write(&cert_path, &self.root_pem).map_err(io(&cert_path))?;
        let key_path = dir.join(ROOT_KEY_FILE);
        write_private(&key_path, &self.key.serialize_pem()).map_err(io(&key_path))?;
        Ok(())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_ders[0]
    }

    /// Every trusted root (a bundle may hold several during a root rotation).
    pub fn root_ders(&self) -> &[CertificateDer<'static>] {
        &self.root_ders
    }

    /// The root bundle as one PEM text.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Certificates between a leaf and the roots (signing certificate first).
    pub fn intermediate_ders(&self) -> Vec<CertificateDer<'static>> {
        self.intermediates.iter().map(|(d, _)| d.clone()).collect()
    }

    /// Signs `public_key` (from a verified CSR) for `identity`, valid from shortly before now
    /// for `ttl`. Returns the chain in the order Istio's certificate service answers with.
    pub fn sign_public_key(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<SignedChain, CaError> {
        let (params, not_before, not_after) = leaf_params(identity, ttl)?;
        let cert = params.signed_by(public_key, &self.issuer, &self.key)?;
        let mut cert_chain = Vec::with_capacity(self.intermediates.len() + 2);
        cert_chain.push(cert.pem());
        cert_chain.extend(self.intermediates.iter().map(|(_, pem)| pem.clone()));
        cert_chain.push(self.root_pem.clone());
        Ok(SignedChain {
            cert_chain,
            not_before,
            not_after,
        })
    }

    /// A TLS server certificate for `dns_names` (the controller's gRPC endpoint), with its
    /// chain PEM (leaf and intermediates) and PKCS#8 key PEM.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        let mut dn = DistinguishedName::new();
        if let Some(first) = dns_names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60).min(ttl / 4)).into();
        params.not_after = (now + ttl).into();
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        let mut chain = cert.pem();
        for (_, pem) in &self.intermediates {
            chain.push_str(pem);
        }
        Ok((chain, key.serialize_pem()))
    }

    /// Mints a leaf certificate for `identity`, valid from shortly before now for `ttl`, usable
    /// for both TLS client and server authentication (HBONE uses it both ways).
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<IssuedCert, CaError> {
        let key = KeyPair::generate()?;
        let (params, not_before, not_after) = leaf_params(identity, ttl)?;
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        let mut chain_pem = cert.pem();
        let mut chain = vec![cert.der().clone()];
        for (der, pem) in &self.intermediates {
            chain_pem.push_str(pem);
            chain.push(der.clone());
        }
        chain_pem.push_str(&self.root_pem);
        chain.push(self.root_der().clone());
        let key_pem = key.serialize_pem();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(IssuedCert {
            identity: identity.clone(),
            chain,
            key: key_der,
            chain_pem,
            key_pem,
            not_before,
            not_after,
        })
    }
}

/// OID of the subjectAltName extension (2.5.29.17).
const SUBJECT_ALT_NAME_OID: &[u64] = &[2, 5, 29, 17];

/// The subject CN of a root this mesh generates; with `O=<trust domain>` it marks the root as
/// ours, so its organisation can be read back as the trust domain.
fn root_common_name(trust_domain: &str) -> String {
    format!("{trust_domain} mesh root CA")
}

/// Parameters of a workload leaf for `identity`: empty subject, a critical URI SAN, usable for
/// both TLS client and server authentication (HBONE uses it both ways), back-dated for clock
/// skew but never so far that a short-lived certificate is born past its rotation point.
fn leaf_params(
    identity: &Identity,
    ttl: Duration,
) -> Result<(CertificateParams, SystemTime, SystemTime), CaError> {
    let uri = identity.to_string();
    // rcgen writes its own SAN extension non-critical; with an empty subject RFC 5280
    // §4.2.1.6 requires it critical, so the SAN is written here as a custom extension.
    rcgen::Ia5String::try_from(uri.clone())
        .map_err(|e| CaError::Identity(format!("{identity}: {e}")))?;
    let mut san = rcgen::CustomExtension::from_oid_content(SUBJECT_ALT_NAME_OID, uri_san_der(&uri));
    san.set_criticality(true);
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.custom_extensions = vec![san];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    let not_before = now - Duration::from_secs(60).min(ttl / 4);
    let not_after = now + ttl;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok((params, not_before, not_after))
}

/// DER of `GeneralNames ::= SEQUENCE { [6] IMPLICIT IA5String uri }`.
fn uri_san_der(uri: &str) -> Vec<u8> {
    let mut name = vec![0x86];
    der_len(&mut name, uri.len());
    name.extend_from_slice(uri.as_bytes());
    let mut out = vec![0x30];
    der_len(&mut out, name.len());
    out.extend_from_slice(&name);
    out
}

fn der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
}

/// Every `CERTIFICATE` block of a PEM text, as DER.
pub fn cert_ders(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// One certificate as PEM (with a trailing newline).
pub fn pem_of(der: &CertificateDer<'_>) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.as_ref().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]);
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The certificates of a PEM text re-encoded one after another (drops anything else).
fn normalize_pem(pem: &str) -> String {
    cert_ders(pem).iter().map(pem_of).collect()
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

fn dn_value_string(v: &rcgen::DnValue) -> Option<String> {
    match v {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The first `CERTIFICATE` block of a PEM text, as DER.
pub fn first_cert_der(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_cert_carries_spiffe_uri_and_chains_to_root() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "default", "proxy");
        let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(issued.chain.len(), 2);
        let ids = crate::tls::identities_of(&issued.chain[0]).unwrap();
        assert_eq!(ids, vec![id]);
        assert!(issued.chain_pem.matches("BEGIN CERTIFICATE").count() == 2);
    }

    #[test]
    fn save_and_load_round_trip_signs_compatible_certs() {
        let dir = std::env::temp_dir().join(format!("ca-test-{}", std::process::id()));
        let ca = MeshCa::generate("example.org").unwrap();
        ca.save(&dir).unwrap();
        let loaded = MeshCa::load(&dir).unwrap();
        assert_eq!(loaded.trust_domain(), "example.org");
        assert_eq!(loaded.root_der(), ca.root_der());
        let id = Identity::new("example.org", "ns", "sa");
        let issued = loaded.issue(&id, Duration::from_secs(60)).unwrap();
        crate::tls::verify_chain(
            &issued.chain[0],
            &[],
            &crate::tls::TrustRoots::new(vec![ca.root_der().clone()]).unwrap(),
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn load_reports_missing_and_garbage_files() {
        let dir = std::env::temp_dir().join(format!("ca-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = MeshCa::load(&dir).unwrap_err().to_string();
        assert!(err.contains(ROOT_CERT_FILE), "{err}");
        std::fs::write(dir.join(ROOT_CERT_FILE), "garbage").unwrap();
        std::fs::write(dir.join(ROOT_KEY_FILE), "garbage").unwrap();
        let err = MeshCa::load(&dir).unwrap_err().to_string();
        assert!(err.contains("not a usable"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// An intermediate signed by an external root: the chain answered is leaf, intermediate,
    /// root bundle, and it verifies to the external root.
    #[test]
    fn plugin_intermediate_ca_returns_full_chain() {
        let root_key = KeyPair::generate().unwrap();
        let mut rp = CertificateParams::default();
        rp.distinguished_name
            .push(DnType::CommonName, "external root");
        rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        rp.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let root = rp.self_signed(&root_key).unwrap();
        let int_key = KeyPair::generate().unwrap();
        let mut ip = CertificateParams::default();
        ip.distinguished_name
            .push(DnType::CommonName, "mesh intermediate");
        ip.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ip.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ip.use_authority_key_identifier_extension = true;
        let int = ip.signed_by(&int_key, &root, &root_key).unwrap();
        let chain_pem = format!("{}{}", int.pem(), root.pem());
        let ca = MeshCa::from_plugin_pems(
            "cluster.local",
            &int.pem(),
            &int_key.serialize_pem(),
            Some(&root.pem()),
            Some(&chain_pem),
        )
        .unwrap();
        let wrong_key = KeyPair::generate().unwrap().serialize_pem();
        let err = MeshCa::from_plugin_pems("cluster.local", &int.pem(), &wrong_key, None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match"), "{err}");

        let id = Identity::new("cluster.local", "ns", "sa");
        let leaf_key = KeyPair::generate().unwrap();
        let signed = ca
            .sign_public_key(&leaf_key, &id, Duration::from_secs(600))
            .unwrap();
        assert_eq!(signed.cert_chain.len(), 3);
        assert_eq!(
            first_cert_der(&signed.cert_chain[1]).as_ref(),
            Some(int.der())
        );
        assert_eq!(
            first_cert_der(&signed.cert_chain[2]).as_ref(),
            Some(root.der())
        );
        let leaf = first_cert_der(&signed.cert_chain[0]).unwrap();
        let roots = crate::tls::TrustRoots::new(vec![root.der().clone()]).unwrap();
        crate::tls::verify_chain(&leaf, &[int.der().clone()], &roots).unwrap();
        // Without the intermediate the leaf does not chain to the root.
        assert!(crate::tls::verify_chain(&leaf, &[], &roots).is_err());
        // Locally minted leaves (standalone mode) carry the intermediate too.
        let issued = ca.issue(&id, Duration::from_secs(600)).unwrap();
        assert_eq!(issued.chain.len(), 3);
        crate::tls::verify_chain(&issued.chain[0], &issued.chain[1..2], &roots).unwrap();
        // A PEM re-encoding round-trips.
        assert_eq!(cert_ders(&pem_of(root.der())), vec![root.der().clone()]);
    }

    /// A CA certificate + key like Istio's samples (`O=Istio`, `CN=<cn>`), self-signed or
    /// signed by `by`.
    fn istio_style_ca(
        cn: &str,
        by: Option<(&rcgen::Certificate, &KeyPair)>,
    ) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::OrganizationName, "Istio");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = match by {
            None => p.self_signed(&key).unwrap(),
            Some((issuer, issuer_key)) => {
                p.use_authority_key_identifier_extension = true;
                p.signed_by(&key, issuer, issuer_key).unwrap()
            }
        };
        (cert, key)
    }

    fn temp_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ca-{label}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Istio's sample root says `O=Istio`: that is not the trust domain. Without
    /// `--trust-domain` it is Istio's default `cluster.local`; with it, the one given.
    #[test]
    fn foreign_root_organisation_is_not_the_trust_domain() {
        let dir = temp_dir("foreign-root");
        let (root, key) = istio_style_ca("Root CA", None);
        std::fs::write(dir.join(ROOT_CERT_FILE), root.pem()).unwrap();
        std::fs::write(dir.join(ROOT_KEY_FILE), key.serialize_pem()).unwrap();
        assert_eq!(MeshCa::load(&dir).unwrap().trust_domain(), "cluster.local");
        let ca = MeshCa::load_with(&dir, Some("corp.example")).unwrap();
        assert_eq!(ca.trust_domain(), "corp.example");
        let id = Identity::new("corp.example", "ns", "sa");
        let issued = ca.issue(&id, Duration::from_secs(60)).unwrap();
        assert_eq!(
            crate::tls::identities_of(&issued.chain[0]).unwrap(),
            vec![id]
        );
        // Our own generated roots still carry their trust domain.
        let ours = temp_dir("own-root");
        MeshCa::generate("example.org")
            .unwrap()
            .save(&ours)
            .unwrap();
        assert_eq!(
            MeshCa::load_with(&ours, None).unwrap().trust_domain(),
            "example.org"
        );
        std::fs::remove_dir_all(&dir).ok();
        std::fs::remove_dir_all(&ours).ok();
    }

    /// A `--ca-dir` holding Istio's plug-in files (`ca-cert.pem`, `ca-key.pem`,
    /// `root-cert.pem`, `cert-chain.pem`, as `istioctl`'s Makefile makes them): leaves chain
    /// through the intermediate to the root, and a key that does not match is refused.
    #[test]
    fn plugin_ca_directory_is_accepted() {
        let dir = temp_dir("plugin-dir");
        let (root, root_key) = istio_style_ca("Root CA", None);
        let (int, int_key) = istio_style_ca("Intermediate CA", Some((&root, &root_key)));
        std::fs::write(dir.join(CA_CERT_FILE), int.pem()).unwrap();
        std::fs::write(dir.join(CA_KEY_FILE), int_key.serialize_pem()).unwrap();
        std::fs::write(dir.join(ROOT_CERT_FILE), root.pem()).unwrap();
        std::fs::write(
            dir.join(CERT_CHAIN_FILE),
            format!("{}{}", int.pem(), root.pem()),
        )
        .unwrap();
        let ca = MeshCa::load_with(&dir, None).unwrap();
        assert_eq!(ca.trust_domain(), "cluster.local");
        assert_eq!(ca.root_der(), root.der());
        let id = Identity::new("cluster.local", "default", "sleep");
        let issued = ca.issue(&id, Duration::from_secs(60)).unwrap();
        assert_eq!(issued.chain.len(), 3);
        let roots = crate::tls::TrustRoots::new(vec![root.der().clone()]).unwrap();
        crate::tls::verify_chain(&issued.chain[0], &issued.chain[1..2], &roots).unwrap();

        std::fs::write(dir.join(CA_KEY_FILE), root_key.serialize_pem()).unwrap();
        let err = MeshCa::load_with(&dir, None).unwrap_err().to_string();
        assert!(
            err.contains("does not match") && err.contains(&dir.display().to_string()),
            "{err}"
        );
        std::fs::remove_file(dir.join(CA_CERT_FILE)).unwrap();
        let err = MeshCa::load_with(&dir, None).unwrap_err().to_string();
        assert!(err.contains(CA_CERT_FILE), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
