//! Shared set-up of the certificate-service tests: a fake API server with pods and tokens, the
//! real certificate service over TLS on 127.0.0.1, and raw/typed clients.
#![allow(dead_code)]

use common::identity::ca::MeshCa;
use common::identity::caclient::{CaClient, CaClientConfig};
use common::xds::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use common::xds::ca::{IstioCertificateRequest, IstioCertificateResponse};
use controller::ca::authn::TokenReviewAuthenticator;
use controller::ca::impersonation::pod_reflector;
use controller::ca::server::CertificateService;
use controller::ca::{root, serving_identity, CaConfig};
use fake_apiserver::{FakeApiServer, TokenInfo};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Server, ServerTlsConfig};

pub const NS: &str = "ambient-system";
pub const TD: &str = "cluster.local";
pub const ZTUNNEL_A: &str = "token-ztunnel-node-a";
pub const WAYPOINT: &str = "token-waypoint";

pub fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": uid},
        "spec": {"serviceAccountName": sa, "nodeName": node,
                 "containers": [{"name": "c", "image": "x"}]}
    })
}

/// A bound service-account token for `ns/sa`, issued for pod `pod`/`uid`, audience `istio-ca`.
pub fn sa_token(ns: &str, sa: &str, pod: &str, uid: &str) -> TokenInfo {
    let mut extra = BTreeMap::new();
    extra.insert(
        "authentication.kubernetes.io/pod-name".to_string(),
        vec![pod.to_string()],
    );
    extra.insert(
        "authentication.kubernetes.io/pod-uid".to_string(),
        vec![uid.to_string()],
    );
    TokenInfo {
        username: format!("system:serviceaccount:{ns}:{sa}"),
        uid: format!("sa-uid-{sa}"),
        groups: vec!["system:serviceaccounts".into()],
        audiences: vec!["istio-ca".into()],
        extra,
        expired: false,
    }
}

/// A cluster: ztunnel on node-a, `app/web` on node-a, `app/db` on node-b, a waypoint.
pub async fn cluster() -> FakeApiServer {
    let api = FakeApiServer::start().await;
    for p in [
        pod("istio-system", "ztunnel-a", "zt-a-uid", "ztunnel", "node-a"),
        pod("app", "web-1", "web-uid", "web", "node-a"),
        pod("app", "db-1", "db-uid", "db", "node-b"),
        pod("app", "waypoint-1", "wp-uid", "waypoint", "node-b"),
    ] {
        api.create(p).expect("create pod");
    }
    api.add_token(
        ZTUNNEL_A,
        sa_token("istio-system", "ztunnel", "ztunnel-a", "zt-a-uid"),
    );
    api.add_token(
        WAYPOINT,
        sa_token("app", "waypoint", "waypoint-1", "wp-uid"),
    );
    api
}

/// The running certificate service.
pub struct CaServer {
    pub addr: SocketAddr,
    pub ca: Arc<MeshCa>,
    pub root_file: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: TempDir,
}

impl CaServer {
    /// Starts the service (TLS, certificate for `localhost`) on `addr` (port 0: any).
    pub async fn start(api: &FakeApiServer, cfg: CaConfig, addr: SocketAddr) -> CaServer {
        let client = api.client();
        let ca = Arc::new(
            root::load_or_create(
                client.clone(),
                &cfg.namespace,
                &cfg.secret_name,
                &cfg.trust_domain,
            )
            .await
            .expect("CA"),
        );
        Self::start_with(api, cfg, addr, ca).await
    }

    pub async fn start_with(
        api: &FakeApiServer,
        cfg: CaConfig,
        addr: SocketAddr,
        ca: Arc<MeshCa>,
    ) -> CaServer {
        Self::start_following(api, cfg, addr, tokio::sync::watch::channel(ca).1).await
    }

    /// Starts the service signing with the latest CA of `following` (TLS certificate and
    /// `root_file` from the CA it holds now).
    pub async fn start_following(
        api: &FakeApiServer,
        cfg: CaConfig,
        addr: SocketAddr,
        following: tokio::sync::watch::Receiver<Arc<MeshCa>>,
    ) -> CaServer {
        let ca = following.borrow().clone();
        let client = api.client();
        let (pods, run_pods) = pod_reflector(client.clone());
        let pod_task = tokio::spawn(run_pods);
        pods.wait_until_ready().await;
        let authn = Arc::new(TokenReviewAuthenticator::new(client, cfg.audiences.clone()));
        let svc =
            CertificateService::following(following, authn, Arc::new(pods), &cfg).into_server();
        let identity = serving_identity(&ca, &["localhost".to_string()], Duration::from_secs(3600))
            .expect("serving cert");
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .expect("tls")
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = rx.await;
                },
            );
        let task = tokio::spawn(async move {
            let _ = server.await;
            pod_task.abort();
        });
        let dir = TempDir::new("ca-root");
        let root_file = dir.0.join("root-cert.pem");
        std::fs::write(&root_file, ca.root_pem()).unwrap();
        CaServer {
            addr,
            ca,
            root_file,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Stops serving (the port is free again once this returns).
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A proxy-side client configuration (token literal, server name `localhost`).
    pub fn client_config(&self, token: &str, ttl: Duration) -> CaClientConfig {
        CaClientConfig {
            address: self.url(),
            root_cert: Some(self.root_file.clone()),
            server_name: Some("localhost".into()),
            token: Some(token.into()),
            cluster_id: "Kubernetes".into(),
            headers: Vec::new(),
            own_identity: None,
            ttl,
        }
    }

    pub fn client(&self, token: &str) -> CaClient {
        CaClient::new(self.client_config(token, Duration::from_secs(3600))).expect("client")
    }

    /// One raw CreateCertificate call.
    pub async fn raw(
        &self,
        token: Option<&str>,
        csr: &str,
        impersonate: Option<&str>,
    ) -> Result<IstioCertificateResponse, tonic::Status> {
        let pem = std::fs::read(&self.root_file).unwrap();
        let channel: Channel = Endpoint::from_shared(self.url())
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pem))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
            .expect("connect");
        let mut metadata = prost_types::Struct::default();
        if let Some(id) = impersonate {
            metadata.fields.insert(
                "ImpersonatedIdentity".into(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.into())),
                },
            );
        }
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr.to_string(),
            validity_duration: 3600,
            metadata: Some(metadata),
        });
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        IstioCertificateServiceClient::new(channel)
            .create_certificate(req)
            .await
            .map(tonic::Response::into_inner)
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn test_config() -> CaConfig {
    CaConfig {
        namespace: NS.into(),
        ..CaConfig::default()
    }
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}
