//! `controller`: the control-plane binary. Watches the Kubernetes API (in-cluster config,
//! `KUBECONFIG`, or `--api-server`), translates it in the sans-IO index, and serves delta xDS
//! (Istio's WDS + our config type) on `--xds-addr`, plus `/metrics` and `/healthz/ready`.

use anyhow::Context;
use clap::Parser;
use controller::index::{Index, IndexConfig};
use controller::xds::{serve, ServeConfig, XdsConfig, XdsServer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(name = "controller", version, about = "Ambient mesh control plane")]
struct Args {
    /// Kubernetes API server URL (default: in-cluster config or KUBECONFIG).
    #[arg(long, env = "KUBE_API_SERVER")]
    api_server: Option<String>,
    /// Where the delta xDS (and certificate) gRPC services listen.
    #[arg(long, default_value = "0.0.0.0:15012")]
    xds_addr: SocketAddr,
    /// Serving certificate chain and key (PEM) for the gRPC port; without them it serves
    /// plaintext HTTP/2 (tests only: Istio's ztunnel connects over TLS only).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[arg(long, default_value = common::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    #[arg(long, default_value = "cluster.local")]
    domain_suffix: String,
    #[arg(long, default_value = common::snapshot::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

fn tls_config(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<Arc<rustls::ServerConfig>> {
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::logging::init(false, &args.log_level).map_err(anyhow::Error::msg)?;
    let client = match &args.api_server {
        Some(url) => {
            let cfg = kube::Config::new(url.parse().context("--api-server")?);
            kube::Client::try_from(cfg)?
        }
        None => kube::Client::try_default()
            .await
            .context("Kubernetes client")?,
    };
    let index = Index::new(IndexConfig {
        trust_domain: args.trust_domain.clone(),
        domain_suffix: args.domain_suffix.clone(),
        root_namespace: args.root_namespace.clone(),
        ..IndexConfig::default()
    });
    let xds = XdsServer::new(XdsConfig::default(), None);
    let (tx, rx) = tokio::sync::mpsc::channel(8192);
    let (synced_tx, mut synced) = tokio::sync::watch::channel(false);
    tokio::spawn(controller::watch::run_watchers(client, tx));
    tokio::spawn(controller::feed::feed(rx, index, xds.clone(), synced_tx));
    synced
        .wait_for(|s| *s)
        .await
        .context("index feed stopped")?;

    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tls_config(c, k)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(args.xds_addr)
        .await
        .with_context(|| format!("bind {}", args.xds_addr))?;
    tracing::info!(addr = %args.xds_addr, tls = tls.is_some(), "controller serving xDS");
    let routes = tonic::service::Routes::new(xds.service());
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
    Ok(())
}
