//! Certificate signing requests (PEM PKCS#10) as Istio's certificate service carries them:
//! building one for a SPIFFE identity around a fresh ECDSA P-256 key (the proxy side; the key
//! never leaves the process) and verifying one (the CA side: parse, check the self-signature,
//! read the requested URI SANs).

use super::Identity;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, KeyPair, SanType,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("cannot build a CSR: {0}")]
    Build(String),
    #[error(
        "not a valid PKCS#10 certificate signing request (or its signature does not verify): {0}"
    )]
    Invalid(String),
}

/// A CSR ready to send and the private key it was made for.
pub struct NewCsr {
    pub pem: String,
    pub key: KeyPair,
}

impl std::fmt::Debug for NewCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewCsr").finish_non_exhaustive()
    }
}

/// A fresh ECDSA P-256 key and a CSR (SHA-256 signature, empty subject) whose single URI SAN
/// is `identity`.
pub fn build(identity: &Identity) -> Result<NewCsr, CsrError> {
    let err = |e: rcgen::Error| CsrError::Build(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let uri = rcgen::Ia5String::try_from(identity.to_string()).map_err(err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri)];
    let pem = params
        .serialize_request(&key)
        .map_err(err)?
        .pem()
        .map_err(err)?;
    Ok(NewCsr { pem, key })
}

/// A CSR whose self-signature verified: the public key to certify and the URI SANs asked for.
#[derive(Debug)]
pub struct VerifiedCsr {
    pub public_key: rcgen::PublicKey,
    pub uri_sans: Vec<String>,
}

/// Parses a PEM CSR and checks its signature. Extensions other than key usage, extended key
/// usage and subject alternative names are refused.
pub fn verify(pem: &str) -> Result<VerifiedCsr, CsrError> {
    let parsed = CertificateSigningRequestParams::from_pem(pem)
        .map_err(|e| CsrError::Invalid(e.to_string()))?;
    let uri_sans = parsed
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_string()),
            _ => None,
        })
        .collect();
    Ok(VerifiedCsr {
        public_key: parsed.public_key,
        uri_sans,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::MeshCa;
    use std::time::Duration;

    #[test]
    fn built_csr_verifies_and_carries_the_identity() {
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let csr = build(&id).unwrap();
        let v = verify(&csr.pem).unwrap();
        assert_eq!(v.uri_sans, vec![id.to_string()]);
    }

    #[test]
    fn tampered_or_garbage_csr_is_refused() {
        let csr = build(&Identity::new("cluster.local", "ns1", "sa1")).unwrap();
        // Flip one base64 character inside the body (the signed part or the signature).
        let mut lines: Vec<String> = csr.pem.lines().map(str::to_string).collect();
        let mid = lines.len() / 2;
        let line = &mut lines[mid];
        let c = if line.starts_with('A') { "B" } else { "A" };
        line.replace_range(0..1, c);
        let tampered = lines.join("\n");
        assert!(matches!(verify(&tampered), Err(CsrError::Invalid(_))));
        assert!(matches!(verify("not a csr"), Err(CsrError::Invalid(_))));
    }

    #[test]
    fn signed_leaf_has_empty_subject_critical_uri_san_and_full_chain() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let csr = build(&id).unwrap();
        let v = verify(&csr.pem).unwrap();
        let signed = ca
            .sign_public_key(&v.public_key, &id, Duration::from_secs(600))
            .unwrap();
        assert_eq!(signed.cert_chain.len(), 2);
        assert_eq!(signed.cert_chain[1], ca.root_pem());
        let leaf = crate::identity::ca::first_cert_der(&signed.cert_chain[0]).unwrap();
        assert_eq!(crate::tls::identities_of(&leaf).unwrap(), vec![id]);
        let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
        assert!(x.subject().iter().next().is_none(), "subject must be empty");
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical);
        // The certified key is the CSR's key.
        assert_eq!(
            x.tbs_certificate.subject_pki.raw,
            csr.key.public_key_der().as_slice()
        );
        let roots = crate::tls::TrustRoots::new(vec![ca.root_der().clone()]).unwrap();
        crate::tls::verify_chain(&leaf, &[], &roots).unwrap();
    }

    /// A CSR as the BoringSSL/OpenSSL builds of Istio's ztunnel (its release images) make it:
    /// empty subject, the URI SAN in an extensionRequest attribute marked **critical**, ECDSA
    /// P-256 with SHA-256. Made with `openssl req -new -subj / -addext
    /// "subjectAltName=critical,URI:spiffe://cluster.local/ns/default/sa/sa-a"`.
    const OPENSSL_CRITICAL_SAN_CSR: &str = "\
-----BEGIN CERTIFICATE REQUEST-----
MIIBBTCBrAIBADAAMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAETzh8tqf/qc5u
5AL2lcnsFHC1XVstWIb3YZEryhXq1qDmhvZqP472Rim5wIUrF5eEtS8MbAJm6S8U
fFEWMh3Iy6BKMEgGCSqGSIb3DQEJDjE7MDkwNwYDVR0RAQH/BC0wK4Ypc3BpZmZl
Oi8vY2x1c3Rlci5sb2NhbC9ucy9kZWZhdWx0L3NhL3NhLWEwCgYIKoZIzj0EAwID
SAAwRQIhAI9gcGeuCSV9MrBDbiWNjbWCSi7oLD49SKxBLbazO21CAiAWeoSl0urI
CP1mF1D0TCvaUkkTJiW7I/6wGaYwteSyDA==
-----END CERTIFICATE REQUEST-----
";

    #[test]
    fn openssl_style_csr_with_a_critical_uri_san_verifies() {
        let v = verify(OPENSSL_CRITICAL_SAN_CSR).unwrap();
        assert_eq!(
            v.uri_sans,
            vec!["spiffe://cluster.local/ns/default/sa/sa-a"]
        );
    }
}
