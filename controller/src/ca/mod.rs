//! The certificate authority of the control plane: Istio's certificate service
//! ([`server`]) over the mesh CA whose material lives in a Kubernetes Secret ([`root`]),
//! following that Secret without a restart ([`follow`]), caller authentication by TokenReview ([`authn`]), node-agent impersonation rules
//! ([`impersonation`], over the [`pod_index`] of pods by node and identity), root ConfigMap publishing by the lease holder ([`crate::leader`]).

pub mod authn;
pub mod follow;
pub mod impersonation;
pub mod pod_index;
pub mod root;
pub mod server;

use common::identity::ca::MeshCa;
use impersonation::NodeAccount;
use std::time::Duration;

/// Settings of the certificate service.
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub trust_domain: String,
    /// Namespace the controller runs in (its Secret, Lease and a root ConfigMap live there).
    pub namespace: String,
    /// Secret holding the CA material.
    pub secret_name: String,
    /// Audiences a caller's token must be bound to.
    pub audiences: Vec<String>,
    /// Service accounts allowed to ask for their node's workloads' certificates.
    pub node_accounts: Vec<NodeAccount>,
    /// Longest certificate lifetime handed out (longer requests are capped).
    pub max_ttl: Duration,
    /// Shortest certificate lifetime handed out.
    pub min_ttl: Duration,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            trust_domain: common::identity::DEFAULT_TRUST_DOMAIN.into(),
            namespace: "ambient-system".into(),
            secret_name: "ambient-ca".into(),
            audiences: vec!["istio-ca".into()],
            node_accounts: impersonation::default_node_accounts(),
            max_ttl: Duration::from_secs(24 * 3600),
            min_ttl: Duration::from_secs(60),
        }
    }
}

/// The controller's own TLS serving certificate for its gRPC port, signed by the mesh CA so
/// proxies verify it with the published root: `(cert chain PEM, key PEM)`.
pub fn serving_identity(
    ca: &MeshCa,
    dns_names: &[String],
    ttl: Duration,
) -> Result<tonic::transport::Identity, common::identity::ca::CaError> {
    let (chain, key) = ca.issue_server(dns_names, ttl)?;
    Ok(tonic::transport::Identity::from_pem(chain, key))
}

/// The names Istio's charts point proxies at by default (`XDS_ADDRESS`/`CA_ADDRESS` =
/// `istiod.istio-system.svc:15012`): carried by the serving certificate too, so an unmodified
/// Istio ztunnel verifies it once a Service of that name selects the controller.
pub const ISTIOD_DNS_NAMES: [&str; 2] = [
    "istiod.istio-system.svc",
    "istiod.istio-system.svc.cluster.local",
];

/// Every name of the serving certificate: the controller Service's DNS names, Istio's default
/// control-plane names ([`ISTIOD_DNS_NAMES`]) and `extra` (`--serving-san`: more DNS names or
/// IP addresses, e.g. the pod IP when proxies dial it directly).
pub fn serving_names(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let mut names = service_dns_names(service, namespace);
    for n in ISTIOD_DNS_NAMES
        .iter()
        .map(|n| n.to_string())
        .chain(extra.iter().cloned())
    {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

/// DNS names the controller answers to in `namespace` as Service `service`.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        "localhost".to_string(),
    ]
}
