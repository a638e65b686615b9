//! Who is calling the control plane: the [`Authenticator`] trait the gRPC services (xDS, CA)
//! call once per stream or request with the request's metadata (`authorization: Bearer <jwt>`,
//! `clusterid`), and the [`CallerIdentity`] it yields. The Kubernetes implementation (a
//! TokenReview of the bearer token) lives with the CA; the services only see this trait.

use tonic::metadata::MetadataMap;

/// The authenticated caller: the Kubernetes service account a token was issued to and, when the
/// token is bound to a pod, that pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallerIdentity {
    /// Namespace of the service account.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// Pod the token is bound to (`authentication.kubernetes.io/pod-name`), if any.
    pub pod_name: Option<String>,
    /// UID of that pod, if any.
    pub pod_uid: Option<String>,
    /// Cluster the token was reviewed against (the `clusterid` header; empty = local).
    pub cluster_id: String,
}

impl CallerIdentity {
    /// The SPIFFE identity of the service account: `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// Authenticates a caller from its gRPC request metadata. Implementations fail closed: any
/// doubt is an error (`Status::unauthenticated` for a missing/invalid credential,
/// `Status::unavailable` when the verifier cannot be reached).
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// Verifies the credentials in `metadata` and returns who the caller is.
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<CallerIdentity, tonic::Status>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_names_namespace_and_service_account() {
        let c = CallerIdentity {
            namespace: "istio-system".into(),
            service_account: "ztunnel".into(),
            pod_name: None,
            pod_uid: None,
            cluster_id: String::new(),
        };
        assert_eq!(
            c.spiffe_id("cluster.local"),
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        );
    }
}
