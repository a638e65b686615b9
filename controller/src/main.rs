//! `controller`: the control-plane binary. Watches the Kubernetes API (in-cluster config,
//! `KUBECONFIG`, or `--api-server`), translates it in the sans-IO index, and serves on one gRPC
//! port (`--xds-addr`, TLS with a certificate from the mesh CA): delta xDS (Istio's WDS + our
//! config type) and Istio's certificate service, both authenticating callers by TokenReview.
//! The mesh CA lives in a Secret (created on first start); the Lease holder publishes its root
//! to every ambient namespace. `/metrics` and `/healthz/ready` on `--monitoring-addr`.

use anyhow::Context;
use clap::Parser;
use controller::auth::Authenticator;
use controller::ca::authn::TokenReviewAuthenticator;
use controller::ca::impersonation::{default_node_accounts, pod_reflector, NodeAccount};
use controller::ca::server::CertificateService;
use controller::ca::{root, serving_names, CaConfig};
use controller::index::{Index, IndexConfig};
use controller::leader;
use controller::serving::ServingCert;
use controller::xds::{serve, ServeConfig, XdsConfig, XdsServer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "controller", version, about = "Ambient mesh control plane")]
struct Args {
    /// Kubernetes API server URL (default: in-cluster config or KUBECONFIG).
    #[arg(long, env = "KUBE_API_SERVER")]
    api_server: Option<String>,
    /// Where the gRPC services (delta xDS and certificates) listen.
    #[arg(long, default_value = "0.0.0.0:15012")]
    xds_addr: SocketAddr,
    /// `/metrics` and `/healthz/ready`.
    #[arg(long, default_value = "0.0.0.0:15014")]
    monitoring_addr: SocketAddr,
    /// Serving certificate chain and key (PEM) for the gRPC port. Default: a certificate from
    /// the mesh CA for the controller Service's names and `--serving-san`, renewed in place.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve the gRPC port without TLS (tests; Istio's ztunnel only connects over TLS).
    #[arg(long, conflicts_with = "tls_cert")]
    plaintext: bool,
    /// Extra names (DNS names or IP addresses) for the serving certificate, e.g. the pod IP.
    /// It always carries the controller Service's names and `istiod.istio-system.svc`.
    #[arg(long = "serving-san", env = "SERVING_SANS", value_delimiter = ',')]
    serving_sans: Vec<String>,
    /// Name of the controller's Service (its DNS names go in the serving certificate).
    #[arg(long, default_value = "ambient-controller")]
    service_name: String,
    /// Namespace the controller runs in (CA Secret, Lease, root ConfigMap).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ambient-system")]
    namespace: String,
    /// This replica's name in the Lease (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Secret holding the mesh CA (`ca-cert.pem`, `ca-key.pem`, optional `root-cert.pem`,
    /// `cert-chain.pem`: Istio's plug-in CA keys); generated and stored when absent.
    #[arg(long, default_value = "ambient-ca")]
    ca_secret: String,
    /// Audiences a caller's token must be bound to.
    #[arg(
        long = "token-audience",
        default_value = "istio-ca",
        value_delimiter = ','
    )]
    audiences: Vec<String>,
    /// Service accounts (`namespace/name`) allowed to fetch certificates for the workloads on
    /// their own node (default: istio-system/ztunnel and ambient-system/ztunnel).
    #[arg(long = "node-account")]
    node_accounts: Vec<NodeAccount>,
    /// Longest workload certificate lifetime handed out.
    #[arg(long, default_value = "24h", value_parser = common::duration::parse)]
    max_cert_ttl: Duration,
    /// Serve xDS to unauthenticated callers (tests only; the default requires a service-account
    /// token, as istiod does).
    #[arg(long)]
    xds_unauthenticated: bool,
    #[arg(long, default_value = common::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    #[arg(long, default_value = "cluster.local")]
    domain_suffix: String,
    #[arg(long, default_value = common::snapshot::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Create the Istio CRDs we read (VirtualService & co.) where the cluster lacks them
    /// (never replacing an existing one); `false` leaves CRDs entirely to the installer.
    #[arg(long, env = "INSTALL_CRDS", default_value_t = true, action = clap::ArgAction::Set)]
    install_crds: bool,
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

fn file_tls_config(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("{}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("{}", key.display()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    Ok(Arc::new(cfg))
}

async fn kube_client(api_server: Option<&str>) -> anyhow::Result<kube::Client> {
    match api_server {
        Some(url) => {
            let cfg = kube::Config::new(url.parse().context("--api-server")?);
            Ok(kube::Client::try_from(cfg)?)
        }
        None => kube::Client::try_default()
            .await
            .context("Kubernetes client"),
    }
}

fn replica_name(args: &Args) -> String {
    args.pod_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("controller-{}", std::process::id()))
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Held to the end of main: dropping it stops the log writer thread.
    let _log = common::logging::init(false, &args.log_level).map_err(anyhow::Error::msg)?;
    let client = kube_client(args.api_server.as_deref()).await?;

    let mut registry = prometheus_client::registry::Registry::default();
    let xds_metrics = Arc::new(controller::xds::Metrics::register(&mut registry));
    registry.register_collector(Box::new(common::logging::DroppedLines::new(
        "controller_log_lines_dropped",
    )));
    let ready = Arc::new(AtomicBool::new(false));
    let registry = Arc::new(registry);
    {
        let (ready, registry) = (ready.clone(), registry.clone());
        let handler: common::admin_http::Handler = Arc::new(move |req| {
            if req.uri().path() == "/healthz/ready" {
                common::admin_http::readiness(&ready, req)
            } else {
                common::admin_http::metrics(&registry, req)
            }
        });
        common::admin_http::spawn("monitoring", vec![(args.monitoring_addr, handler)])
            .context("monitoring listener")?;
    }

    // The mesh CA: every replica signs with the same key, read from (or first stored in) the
    // Secret.
    let ca_cfg = CaConfig {
        trust_domain: args.trust_domain.clone(),
        namespace: args.namespace.clone(),
        secret_name: args.ca_secret.clone(),
        audiences: args.audiences.clone(),
        node_accounts: if args.node_accounts.is_empty() {
            default_node_accounts()
        } else {
            args.node_accounts.clone()
        },
        max_ttl: args.max_cert_ttl,
        ..CaConfig::default()
    };
    let ca = Arc::new(
        root::load_or_create(
            client.clone(),
            &ca_cfg.namespace,
            &ca_cfg.secret_name,
            &ca_cfg.trust_domain,
        )
        .await
        .context("loading the mesh CA")?,
    );

    // Leadership: only the Lease holder writes shared objects.
    let election = leader::elect(
        client.clone(),
        &args.namespace,
        leader::LEASE_NAME,
        &replica_name(&args),
        leader::LEASE_SECONDS,
    );
    // Every replica follows the CA Secret (a rotated or plugged-in CA signs at once); replaced
    // roots stay in the bundle for the longest certificate lifetime.
    let (following, follow_task) = controller::ca::follow::follow_secret(
        client.clone(),
        &ca_cfg.namespace,
        &ca_cfg.secret_name,
        ca.clone(),
        ca_cfg.max_ttl,
    );
    tokio::spawn(follow_task);
    tokio::spawn(root::publish_roots(
        client.clone(),
        args.namespace.clone(),
        following.roots.clone(),
        election.is_leader.clone(),
    ));
    if args.install_crds {
        tokio::spawn(controller::crds::run(
            client.clone(),
            election.is_leader.clone(),
        ));
    }
    tokio::spawn(controller::waypoint::run(
        client.clone(),
        controller::waypoint::WaypointConfig {
            domain_suffix: args.domain_suffix.clone(),
            ..controller::waypoint::WaypointConfig::from_env()
        },
        election.is_leader.clone(),
    ));

    let authn = Arc::new(TokenReviewAuthenticator::new(
        client.clone(),
        ca_cfg.audiences.clone(),
    ));
    let (pods, pods_task) = pod_reflector(client.clone());
    tokio::spawn(pods_task);
    let certificates =
        CertificateService::following(following.ca.clone(), authn.clone(), Arc::new(pods), &ca_cfg)
            .into_server();

    let index = Index::new(IndexConfig {
        trust_domain: args.trust_domain.clone(),
        domain_suffix: args.domain_suffix.clone(),
        root_namespace: args.root_namespace.clone(),
        ..IndexConfig::default()
    });
    let xds_authn: Option<Arc<dyn Authenticator>> = if args.xds_unauthenticated {
        tracing::warn!("xDS is served to unauthenticated callers (--xds-unauthenticated)");
        None
    } else {
        Some(authn)
    };
    let xds = XdsServer::with_metrics(XdsConfig::default(), xds_authn, xds_metrics);
    let (tx, rx) = tokio::sync::mpsc::channel(8192);
    let (synced_tx, mut synced) = tokio::sync::watch::channel(false);
    let (verdicts_tx, verdicts) = tokio::sync::watch::channel(Default::default());
    tokio::spawn(controller::events::run(
        client.clone(),
        controller::events::EventsConfig {
            instance: replica_name(&args),
            ..Default::default()
        },
        election.is_leader.clone(),
        verdicts,
        xds.nack_reports(1024),
    ));
    tokio::spawn(controller::watch::run_watchers(client.clone(), tx));
    tokio::spawn(controller::feed::feed_with_verdicts(
        rx,
        index,
        xds.clone(),
        synced_tx,
        verdicts_tx,
    ));
    synced
        .wait_for(|s| *s)
        .await
        .context("index feed stopped")?;

    let tls = if args.plaintext {
        tracing::warn!("gRPC served without TLS (--plaintext)");
        None
    } else if let (Some(c), Some(k)) = (&args.tls_cert, &args.tls_key) {
        Some(file_tls_config(c, k)?)
    } else {
        let names = serving_names(&args.service_name, &args.namespace, &args.serving_sans);
        let ttl = Duration::from_secs(30 * 24 * 3600);
        let serving = ServingCert::new(&ca, &names, ttl).context("serving certificate")?;
        serving.spawn_rotation_following(
            following.ca.clone(),
            names,
            ttl,
            controller::serving::ROOT_PROPAGATION,
        );
        Some(serving.server_config()?)
    };
    let listener = tokio::net::TcpListener::bind(args.xds_addr)
        .await
        .with_context(|| format!("bind {}", args.xds_addr))?;
    tracing::info!(addr = %args.xds_addr, tls = tls.is_some(), "controller serving xDS and certificates");
    ready.store(true, Ordering::Release);
    let routes = tonic::service::Routes::new(xds.service()).add_service(certificates);
    serve(
        listener,
        routes,
        ServeConfig {
            tls,
            ..ServeConfig::default()
        },
        async {
            let _ = common::drain::shutdown_signal().await;
        },
    )
    .await?;
    ready.store(false, Ordering::Release);
    election.stop().await;
    Ok(())
}
