//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: authenticate the caller, decide
//! which identity it may obtain (its own, or an `ImpersonatedIdentity` for a node agent), check
//! that the CSR asks for exactly that identity (istiod ignores CSR SANs; refusing a mismatch is
//! safer), and sign the CSR's key with the mesh CA. The answer is the chain Istio's proxies
//! expect: leaf, one intermediate per element, root bundle last.

use super::impersonation::{self, NodeAccount, PodDirectory};
use super::CaConfig;
use crate::auth::Authenticator;
use common::identity::ca::MeshCa;
use common::identity::{csr, Identity};
use common::xds::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use common::xds::ca::{IstioCertificateRequest, IstioCertificateResponse};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// Metadata key naming the identity a node agent asks for on a workload's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The certificate service.
pub struct CertificateService<A, P> {
    /// The CA to sign with (replaced when its Secret changes, see [`super::follow`]).
    ca: tokio::sync::watch::Receiver<Arc<MeshCa>>,
    authn: Arc<A>,
    pods: Arc<P>,
    node_accounts: Vec<NodeAccount>,
    max_ttl: Duration,
    min_ttl: Duration,
}

impl<A: Authenticator, P: PodDirectory> CertificateService<A, P> {
    /// A service signing with `ca`, always.
    pub fn new(ca: Arc<MeshCa>, authn: Arc<A>, pods: Arc<P>, cfg: &CaConfig) -> Self {
        Self::following(tokio::sync::watch::channel(ca).1, authn, pods, cfg)
    }

    /// A service signing with the latest CA `ca` holds.
    pub fn following(
        ca: tokio::sync::watch::Receiver<Arc<MeshCa>>,
        authn: Arc<A>,
        pods: Arc<P>,
        cfg: &CaConfig,
    ) -> Self {
        CertificateService {
            ca,
            authn,
            pods,
            node_accounts: cfg.node_accounts.clone(),
            max_ttl: cfg.max_ttl,
            min_ttl: cfg.min_ttl,
        }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
    }

    /// The certificate lifetime for a requested `validity_duration` (seconds; ≤ 0 = maximum).
    pub fn ttl(&self, requested_secs: i64) -> Duration {
        if requested_secs <= 0 {
            return self.max_ttl;
        }
        Duration::from_secs(requested_secs as u64).clamp(self.min_ttl, self.max_ttl)
    }

    async fn create(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        req: &IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, Status> {
        let caller = self.authn.authenticate(metadata).await?;
        let ca = self.ca.borrow().clone();
        let td = ca.trust_domain();
        let requested = match impersonated(req)? {
            Some(id) => id,
            None => Identity::new(td, &caller.namespace, &caller.service_account),
        };
        impersonation::authorize(
            &caller,
            &requested,
            td,
            &self.node_accounts,
            self.pods.as_ref(),
        )?;
        let verified =
            csr::verify(&req.csr).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let want = requested.to_string();
        if verified.uri_sans != [want.as_str()] {
            return Err(Status::invalid_argument(format!(
                "CSR URI SANs {:?} do not match the identity being issued {want}",
                verified.uri_sans
            )));
        }
        let ttl = self.ttl(req.validity_duration);
        let signed = ca
            .sign_public_key(&verified.public_key, &requested, ttl)
            .map_err(|e| {
                tracing::error!(identity = %requested, error = %e, "signing failed");
                Status::internal("signing failed")
            })?;
        tracing::info!(
            identity = %requested,
            caller = %format!("{}/{}", caller.namespace, caller.service_account),
            ttl_secs = ttl.as_secs(),
            "issued certificate"
        );
        Ok(IstioCertificateResponse {
            cert_chain: signed.cert_chain,
        })
    }
}

/// The `ImpersonatedIdentity` of a request's metadata, if set (a full SPIFFE URI).
fn impersonated(req: &IstioCertificateRequest) -> Result<Option<Identity>, Status> {
    use prost_types::value::Kind;
    let Some(v) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &v.kind {
        Some(Kind::StringValue(s)) if s.is_empty() => Ok(None),
        Some(Kind::StringValue(s)) if s.starts_with("spiffe://") => Identity::parse(s)
            .map(Some)
            .map_err(|e| Status::invalid_argument(e.to_string())),
        _ => Err(Status::invalid_argument(format!(
            "{IMPERSONATED_IDENTITY} must be a spiffe:// URI string"
        ))),
    }
}

#[tonic::async_trait]
impl<A: Authenticator, P: PodDirectory> IstioCertificateService for CertificateService<A, P> {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        self.create(&metadata, &req).await.map(Response::new)
    }
}
