//! The built-in mesh CA for standalone mode: a root certificate and key kept in PEM files, and
//! minting of short-lived SPIFFE leaf certificates signed by it.

use super::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// File names inside a CA directory (the same names Istio's plug-in CA uses).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";

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

/// The mesh root: signs workload certificates.
pub struct MeshCa {
    issuer: rcgen::Certificate,
    key: KeyPair,
    root_der: CertificateDer<'static>,
    root_pem: String,
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
        dn.push(DnType::CommonName, format!("{trust_domain} mesh root CA"));
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
            root_der,
            root_pem,
            trust_domain: trust_domain.to_string(),
        })
    }

    /// Loads `root-cert.pem` and `root-key.pem` from `dir`.
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
        let trust_domain = params
            .distinguished_name
            .get(&DnType::OrganizationName)
            .and_then(dn_value_string)
            .unwrap_or_else(|| super::DEFAULT_TRUST_DOMAIN.to_string());
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
            root_der,
            root_pem: cert_pem,
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
        &self.root_der
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Mints a leaf certificate for `identity`, valid from shortly before now for `ttl`, usable
    /// for both TLS client and server authentication (HBONE uses it both ways).
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<IssuedCert, CaError> {
        let uri = rcgen::Ia5String::try_from(identity.to_string())
            .map_err(|e| CaError::Identity(format!("{identity}: {e}")))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
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
        // Back-date for clock skew between peers, but never so far that a short-lived
        // certificate is born past its rotation point.
        let not_before = now - Duration::from_secs(60).min(ttl / 4);
        let not_after = now + ttl;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        let chain_pem = format!("{}{}", cert.pem(), self.root_pem);
        let key_pem = key.serialize_pem();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(IssuedCert {
            identity: identity.clone(),
            chain: vec![cert.der().clone(), self.root_der.clone()],
            key: key_der,
            chain_pem,
            key_pem,
            not_before,
            not_after,
        })
    }
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
}
