//! Command line and wiring: config and certificates, the `inbound_CONNECT_terminate`
//! listener, admin/metrics/readiness, and drain on SIGTERM.

use crate::metrics::Metrics;
use crate::upstream::Upstreams;
use anyhow::{bail, Context};
use clap::Parser;
use common::admin_http::{self, Handler};
use common::config::watch::ConfigStore;
use common::drain::{Drain, DrainWatch};
use common::hbone::client::{plain_dialer, HboneClient, PoolTimings};
use common::hbone::H2Settings;
use common::identity::ca::MeshCa;
use common::identity::caclient::{remote_store, RemoteCa};
use common::identity::store::{CertStore, RemoteOptions};
use common::identity::Identity;
use common::xds::client::{XdsClient, XdsConfig};
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "waypoint",
    version,
    about = "Ambient mesh L7 proxy (HBONE in, routes, HBONE out)"
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the waypoint.
    Run(Box<RunArgs>),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Local configuration file (YAML), reloaded when it changes. Either this or
    /// `--xds-address`.
    #[arg(long, env = "WAYPOINT_CONFIG", required_unless_present = "xds_address")]
    pub config: Option<PathBuf>,
    /// The control plane, instead of `--config`: `https://host:port` (Istio's `XDS_ADDRESS`;
    /// token, root and node metadata from Istio's environment variables).
    #[arg(long, env = "XDS_ADDRESS", conflicts_with = "config")]
    pub xds_address: Option<String>,
    /// PEM file the control plane's certificate must chain to (overrides `XDS_ROOT_CA`).
    #[arg(long)]
    pub xds_root_ca: Option<PathBuf>,
    /// This node's name, sent to the control plane (`NODE_NAME`).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node: String,
    /// Directory with the mesh root (root-cert.pem, root-key.pem) or Istio's plug-in CA files
    /// (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem).
    #[arg(long, required_unless_present = "ca_address")]
    pub ca_dir: Option<PathBuf>,
    /// Trust domain of identities minted from `--ca-dir` (default: the one of a root this mesh
    /// generated, else `cluster.local`).
    #[arg(long, env = "TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// The control plane's certificate service (cluster mode), replacing `--ca-dir`.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// Root bundle PEM verifying the certificate service and mesh peers (cluster mode).
    #[arg(long, env = "CA_ROOT_CA")]
    pub ca_root: Option<PathBuf>,
    /// Bearer token file for the certificate service, re-read on every request.
    #[arg(long, env = "AUTH_TOKEN")]
    pub token_file: Option<String>,
    /// This waypoint's workload, `<namespace>/<name>` or `<name>` (namespace `default`): its
    /// identity is the one the waypoint presents and forwards with.
    #[arg(long)]
    pub workload: String,
    /// HBONE listener (`inbound_CONNECT_terminate`).
    #[arg(long, default_value = "0.0.0.0:15006")]
    pub listen: SocketAddr,
    /// Also terminate HBONE here: Istio's ztunnel dials a waypoint pod on 15008, the port its
    /// Service names `mesh`. `none` turns it off.
    #[arg(long, default_value = "0.0.0.0:15008")]
    pub listen_mesh: OptionalAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    #[arg(long, default_value = "5s", value_parser = common::duration::parse)]
    pub drain_timeout: Duration,
    #[arg(long, default_value = "24h", value_parser = common::duration::parse_ttl)]
    pub cert_ttl: Duration,
    #[arg(long, default_value = "1s", value_parser = common::duration::parse)]
    pub config_poll: Duration,
    /// How long to wait for the first bytes before treating a stream as TCP.
    #[arg(long, default_value = "300ms", value_parser = common::duration::parse)]
    pub sniff_timeout: Duration,
    #[arg(long)]
    pub log_json: bool,
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
    /// Data-plane shards: threads with a single-thread runtime each, every connection living
    /// on one of them (default: number of CPUs).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// How long a peer may take for each step of opening an HBONE connection (TLS handshake,
    /// HTTP/2 preface, first CONNECT) before it is closed.
    #[arg(long, default_value = "10s", value_parser = common::duration::parse)]
    pub handshake_timeout: Duration,
    /// How long an HTTP client may take to send a complete request head (on a port declared
    /// HTTP, counted from the stream's start; on keep-alive connections, per request).
    #[arg(long, default_value = "30s", value_parser = common::duration::parse)]
    pub request_header_timeout: Duration,
    /// Live connections the listener accepts; more are reset and counted in
    /// `waypoint_connections_shed_total{reason="connections"}`.
    #[arg(long, default_value_t = common::admission::Caps::default().connections)]
    pub max_connections: usize,
    /// Live connections from one source IP (`reason="per_source"`).
    #[arg(long, default_value_t = common::admission::Caps::default().per_source)]
    pub max_connections_per_source: usize,
    /// TLS handshakes in progress (`reason="handshakes"`).
    #[arg(long, default_value_t = common::admission::Caps::default().handshakes)]
    pub max_concurrent_handshakes: usize,
    /// TLS handshakes in progress from one source IP (`reason="handshakes_per_source"`): a
    /// peer stalling handshakes cannot lock every other peer out of new connections.
    #[arg(long, default_value_t = common::admission::Caps::default().handshakes_per_source)]
    pub max_concurrent_handshakes_per_source: usize,
    /// Connections over their source's handshake cap that wait (socket only, no TLS state)
    /// for one of its places until the handshake timeout, rather than being reset at once —
    /// a reset slowloris only reconnects at once; more than this are reset.
    #[arg(long, default_value_t = common::admission::Caps::default().handshakes_waiting)]
    pub max_waiting_handshakes: usize,
    /// The resolv.conf whose nameservers resolve the DNS-resolution ServiceEntries bound to
    /// this waypoint.
    #[arg(long, env = "WAYPOINT_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
}

/// Everything the request path reads.
pub struct State {
    pub config: Arc<ConfigStore>,
    pub certs: Arc<CertStore>,
    pub identity: Identity,
    /// This waypoint's workload (namespace, name), for policies attached to its Gateway.
    pub workload: (String, String),
    pub upstreams: Upstreams,
    pub metrics: Metrics,
    pub settings: H2Settings,
    pub drain: DrainWatch,
    pub sniff_timeout: Duration,
    /// See [`RunArgs::request_header_timeout`].
    pub request_header_timeout: Duration,
    pub hbone: Arc<HboneClient>,
    pub balancers: crate::route::Balancers,
    pub outliers: crate::outlier::Outliers,
    pub limits: crate::limits::Limits,
    /// A handle to this state for tasks that outlive a request (mirrors).
    pub me: std::sync::Weak<State>,
    /// Mirror copies in flight, at most [`crate::pipeline::MAX_MIRRORS`].
    pub mirror_slots: Arc<tokio::sync::Semaphore>,
    /// L4 connections this waypoint authorized, re-checked on every snapshot swap.
    pub live: Arc<common::revalidate::Registry<crate::tcp::Authorized>>,
    /// Live upgraded connections (WebSocket…), re-checked on every configuration change.
    pub live_upgrades: Arc<common::revalidate::Registry<crate::authz::Grant>>,
    /// Answers for DNS-resolution ServiceEntries (lookups run on the main runtime).
    pub dns: Arc<common::dns_cache::DnsCache>,
    active: AtomicUsize,
}

impl State {
    pub fn track(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.clone())
    }
}

pub struct ActiveGuard(Arc<State>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Command::Run(args) = args.command;
    let log = common::logging::init(args.log_json, &args.log_level).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(*args, log))
}

fn own_identity(store: &ConfigStore, workload: &str) -> anyhow::Result<Identity> {
    let (ns, name) = workload.split_once('/').unwrap_or(("default", workload));
    let snap = store.current();
    match snap
        .workloads
        .iter()
        .find(|w| w.name == name && w.namespace == ns)
    {
        Some(w) => Ok(w.identity()),
        None => bail!("workload {ns}/{name} (--workload) is not in the configuration"),
    }
}

/// The configuration store, fed by a watched file or by the control plane. With xDS this
/// returns once every subscribed type was ACKed and the waypoint's own workload is known
/// (its identity is what the waypoint presents).
async fn config_source(args: &RunArgs) -> anyhow::Result<Arc<ConfigStore>> {
    if let Some(address) = &args.xds_address {
        let mut cfg = XdsConfig::from_env(address.clone(), "waypoint", &args.node, true);
        if let Some(root) = &args.xds_root_ca {
            cfg.root_cert = Some(root.clone());
        }
        // The same projected token authenticates to xDS and to the certificate service.
        if let Some(token) = &args.token_file {
            cfg.token = Some(token.clone());
        }
        let store = Arc::new(ConfigStore::default());
        let synced = Arc::new(AtomicBool::new(false));
        tracing::info!(address = %address, node_id = %cfg.node_id, "configuration from the control plane");
        tokio::spawn(XdsClient::new(cfg, store.clone(), synced.clone()).run());
        let started = Instant::now();
        let mut warned = false;
        while !synced.load(Ordering::Acquire) || own_identity(&store, &args.workload).is_err() {
            if !warned && started.elapsed() > Duration::from_secs(10) {
                warned = true;
                tracing::warn!(workload = %args.workload, "still waiting for the control plane to list this waypoint's workload");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        return Ok(store);
    }
    let Some(path) = &args.config else {
        bail!("either --config or --xds-address is needed");
    };
    let store = Arc::new(
        ConfigStore::from_file(path)
            .with_context(|| format!("initial config {}", path.display()))?,
    );
    // Detached: the watcher lives as long as the process.
    drop(common::config::watch::spawn_file_watcher(
        path.clone(),
        store.clone(),
        args.config_poll,
    ));
    Ok(store)
}

async fn run_async(args: RunArgs, log: common::logging::LogHandle) -> anyhow::Result<()> {
    let config = config_source(&args).await?;
    let identity = own_identity(&config, &args.workload)?;
    let certs = Arc::new(cert_store(&args, &identity)?);
    if certs.is_remote() {
        // Serve as soon as the certificate arrives; connections wait for it meanwhile.
        certs.prefetch(std::slice::from_ref(&identity));
    } else {
        certs.get(&identity)?;
    }
    let settings = H2Settings {
        handshake_timeout: args.handshake_timeout,
        ..H2Settings::default()
    };
    let hbone = HboneClient::new(
        certs.clone(),
        settings,
        PoolTimings::default(),
        plain_dialer(),
    );
    let (drain, drain_watch) = Drain::new();
    let metrics = Metrics::new();
    let live = common::revalidate::Registry::with_counter(metrics.revoked.clone());
    let _revalidator =
        common::revalidate::spawn_revalidator(config.clone(), live.clone(), crate::tcp::check);
    let live_upgrades = common::revalidate::Registry::with_counter(metrics.revoked.clone());
    let _upgrade_revalidator = common::revalidate::spawn_revalidator(
        config.clone(),
        live_upgrades.clone(),
        crate::authz::check_upgraded,
    );
    // Created on the main runtime: every DNS lookup runs here, whichever shard asks.
    let dns = Arc::new(common::dns_cache::DnsCache::from_resolv_conf(
        &args.resolv_conf,
    ));
    let _dns_refresher = common::task::AbortOnDrop(tokio::spawn(dns.clone().run_refresher()));
    let state = Arc::new_cyclic(|me| State {
        live,
        live_upgrades,
        config: config.clone(),
        certs: certs.clone(),
        identity: identity.clone(),
        workload: {
            let (ns, name) = args
                .workload
                .split_once('/')
                .unwrap_or(("default", &args.workload));
            (ns.to_string(), name.to_string())
        },
        upstreams: Upstreams::new(hbone.clone(), identity.clone()),
        metrics,
        settings,
        drain: drain_watch,
        sniff_timeout: args.sniff_timeout,
        request_header_timeout: args.request_header_timeout,
        hbone,
        balancers: Default::default(),
        outliers: Default::default(),
        limits: Default::default(),
        me: me.clone(),
        mirror_slots: Arc::new(tokio::sync::Semaphore::new(crate::pipeline::MAX_MIRRORS)),
        dns,
        active: AtomicUsize::new(0),
    });
    let _housekeeping = common::task::AbortOnDrop(crate::housekeeping::spawn(&state));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let mesh_listener = match args.listen_mesh.0.filter(|a| *a != args.listen) {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind {addr} (--listen-mesh)"))?,
        ),
        None => None,
    };
    let ready = Arc::new(AtomicBool::new(false));
    admin_http::spawn(
        "waypoint-admin",
        admin_handlers(&args, state.clone(), log, ready.clone()),
    )?;
    let shards = Arc::new(common::shards::Shards::start(
        args.worker_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        "waypoint-worker",
    )?);
    // One admission budget for both ports: they are the same listener to a peer.
    let admission = common::admission::Admission::new(
        crate::inbound::LISTENER,
        common::admission::Caps {
            connections: args.max_connections,
            per_source: args.max_connections_per_source,
            handshakes: args.max_concurrent_handshakes,
            handshakes_per_source: args.max_concurrent_handshakes_per_source,
            handshakes_waiting: args.max_waiting_handshakes,
        },
        state.metrics.shed.clone(),
    );
    let accept = tokio::spawn(crate::inbound::serve(
        listener,
        admission.clone(),
        state.clone(),
        shards.clone(),
    ));
    let accept_mesh = mesh_listener
        .map(|l| tokio::spawn(crate::inbound::serve(l, admission, state.clone(), shards)));
    tokio::spawn(rotate(certs, identity.clone(), args.cert_ttl));
    ready.store(true, Ordering::Release);
    tracing::info!(listener = "inbound_CONNECT_terminate", addr = %args.listen, mesh_addr = ?args.listen_mesh.0, identity = %identity, "waypoint ready");

    common::drain::shutdown_signal().await?;
    ready.store(false, Ordering::Release);
    drain.start();
    let deadline = common::duration::std_deadline(args.drain_timeout);
    while state.active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    accept.abort();
    if let Some(a) = accept_mesh {
        a.abort();
    }
    tracing::info!("waypoint stopped");
    Ok(())
}

/// Standalone (`--ca-dir`) or cluster mode (`--ca-address`: the waypoint's own identity from
/// the control plane, never impersonating).
fn cert_store(args: &RunArgs, identity: &Identity) -> anyhow::Result<CertStore> {
    if let Some(dir) = &args.ca_dir {
        let ca =
            MeshCa::load_with(dir, args.trust_domain.as_deref()).context("loading the mesh CA")?;
        return Ok(CertStore::new(ca, args.cert_ttl)?);
    }
    let Some(address) = &args.ca_address else {
        anyhow::bail!("either --ca-dir or --ca-address is required");
    };
    let remote = RemoteCa {
        address: address.clone(),
        root: args.ca_root.clone(),
        token: args.token_file.clone(),
        own_identity: Some(identity.clone()),
        ttl: args.cert_ttl,
        trust_domain: identity.trust_domain.clone(),
    };
    remote_store(remote, RemoteOptions::default()).context("connecting to the certificate service")
}

async fn rotate(certs: Arc<CertStore>, id: Identity, ttl: Duration) {
    let mut tick =
        tokio::time::interval((ttl / 8).clamp(Duration::from_millis(200), Duration::from_secs(60)));
    loop {
        tick.tick().await;
        certs.rotate_due(std::slice::from_ref(&id));
        certs.prefetch(std::slice::from_ref(&id));
    }
}

fn admin_handlers(
    args: &RunArgs,
    state: Arc<State>,
    log: common::logging::LogHandle,
    ready: Arc<AtomicBool>,
) -> Vec<(SocketAddr, Handler)> {
    let s = state.clone();
    let admin: Handler =
        Arc::new(
            move |req: &Request<Incoming>| match (req.method(), req.uri().path()) {
                (&Method::GET, "/config_dump") => {
                    let snap = s.config.current();
                    admin_http::json(&serde_json::json!({
                        "listener": "inbound_CONNECT_terminate",
                        "identity": s.identity.to_string(),
                        "configGeneration": s.config.generation(),
                        "config": &*snap,
                        "routes": crate::route::dump(&snap, &s.identity.namespace),
                    }))
                }
                (&Method::GET, "/healthz") => admin_http::text(StatusCode::OK, "ok"),
                (_, "/logging") => admin_http::logging(&log, req),
                _ => admin_http::text(StatusCode::NOT_FOUND, "not found"),
            },
        );
    let m = state;
    let metrics: Handler =
        Arc::new(move |req: &Request<Incoming>| admin_http::metrics(&m.metrics.registry, req));
    let readiness: Handler =
        Arc::new(move |req: &Request<Incoming>| admin_http::readiness(&ready, req));
    vec![
        (args.admin_addr, admin),
        (args.metrics_addr, metrics),
        (args.readiness_addr, readiness),
    ]
}

/// A socket address, or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

impl std::str::FromStr for OptionalAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("none") {
            return Ok(OptionalAddr(None));
        }
        s.parse()
            .map(|a| OptionalAddr(Some(a)))
            .map_err(|e| format!("{s:?}: {e} (an address, or `none`)"))
    }
}
