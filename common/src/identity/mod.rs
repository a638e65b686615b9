//! SPIFFE identities (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`) and the certificate machinery
//! built on them: the mesh CA and the per-workload certificate store.

pub mod ca;
pub mod caclient;
pub mod csr;
pub mod store;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The default trust domain of an Istio mesh.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity as carried in the URI SAN of mesh certificates.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid SPIFFE identity {input:?}: {reason}")]
pub struct IdentityError {
    pub input: String,
    pub reason: &'static str,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// The Istio "principal" form used by AuthorizationPolicy: `<td>/ns/<ns>/sa/<sa>`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    /// Parses the principal form (`<td>/ns/<ns>/sa/<sa>`) or the full `spiffe://` URI.
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        let err = |reason| IdentityError {
            input: input.to_string(),
            reason,
        };
        let rest = input.strip_prefix("spiffe://").unwrap_or(input);
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                if td.is_empty() || ns.is_empty() || sa.is_empty() {
                    return Err(err("empty trust domain, namespace or service account"));
                }
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(err(
                "expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
            )),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::parse(s)
    }
}

impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Identity::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uri_and_principal_forms() {
        let a = Identity::parse("spiffe://cluster.local/ns/default/sa/proxy").unwrap();
        let b = Identity::parse("cluster.local/ns/default/sa/proxy").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "spiffe://cluster.local/ns/default/sa/proxy");
        assert_eq!(a.principal(), "cluster.local/ns/default/sa/proxy");
    }

    #[test]
    fn rejects_malformed() {
        assert!(Identity::parse("spiffe://cluster.local/ns/default").is_err());
        assert!(Identity::parse("spiffe://cluster.local/ns//sa/x").is_err());
        assert!(Identity::parse("").is_err());
    }
}
