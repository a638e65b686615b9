//! Wiring of the running agent: load config and CA, bind the listeners, install capture, serve,
//! rotate certificates, and drain on SIGTERM. Threading: the data plane runs on shards (one
//! thread and single-thread runtime per CPU, [`common::shards`]); the accept loops, config
//! watcher and certificate rotation on the main thread's runtime; admin, metrics and readiness
//! on their own single-thread runtime.

use crate::admin::{self, AdminState};
use crate::capture::{self, CaptureSpec};
use crate::capture_follow;
use crate::cli::{CaptureMode, LogFormat, RunArgs};
use crate::metrics::Metrics;
use crate::proxy;
use crate::socket;
use crate::state::ProxyState;
use anyhow::Context;
use common::admission::{Admission, Caps};
use common::config::watch::ConfigStore;
use common::drain::Drain;
use common::hbone::client::{Dialer, HboneClient, PoolTimings};
use common::hbone::H2Settings;
use common::identity::ca::MeshCa;
use common::identity::caclient::{remote_store, RemoteCa};
use common::identity::store::{CertStore, RemoteOptions};
use common::identity::Identity;
use common::task::AbortOnDrop;
use common::xds::client::{XdsClient, XdsConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Removes the capture rules when the agent exits through `run` (a normal exit or an unwinding
/// panic; never after SIGKILL). Only with `--remove-capture-on-exit` (node teardown): by
/// default the rules outlive the process, so the node fails closed until the next ztunnel
/// takes them over (see [`capture`]).
struct CaptureGuard;

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        if let Err(e) = capture::remove() {
            tracing::error!(error = %e, "removing capture rules failed");
        }
    }
}

/// glibc's defaults hand every buffer above 128 KiB back to the kernel when freed, so a bulk
/// flow page-faults fresh memory for every read buffer and HTTP/2 frame (≈6 % of its CPU in
/// profiles, ~15 % of single-stream throughput). Keep such buffers on the heap instead; config
/// loads still trim explicitly. (A 2 MiB trim threshold kept RSS after bulk traffic at ~24 MB
/// instead of ~42 MB but cost those 15 %.)
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 * 1024 * 1024);
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    tune_allocator();
    let log = common::logging::init(args.log_format == LogFormat::Json, &args.log_level)
        .map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args, log))
}

/// One shard per CPU.
fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn local_identities(store: &ConfigStore, node: &str) -> Vec<Identity> {
    let snap = store.current();
    let mut ids: Vec<Identity> = snap.local_workloads(node).map(|w| w.identity()).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Where configuration comes from: a watched file, or the control plane. Returns the store
/// and, for xDS, the flag that turns true once every subscribed type was ACKed.
fn config_source(args: &RunArgs) -> anyhow::Result<(Arc<ConfigStore>, Option<Arc<AtomicBool>>)> {
    if let Some(address) = &args.xds_address {
        let mut cfg = XdsConfig::from_env(address.clone(), "ztunnel", &args.node, true);
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
        return Ok((store, Some(synced)));
    }
    let Some(path) = &args.config else {
        anyhow::bail!("either --config or --xds-address is needed");
    };
    // `from_file` records the content hash, so the watcher's first tick does not parse the
    // unchanged file a second time.
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
    Ok((store, None))
}

/// Standalone (`--ca-dir`: minted from the local mesh root) or cluster mode (`--ca-address`:
/// fetched from the control plane on behalf of the node's workloads).
fn cert_store(args: &RunArgs, store: &ConfigStore) -> anyhow::Result<CertStore> {
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
        own_identity: None,
        ttl: args.cert_ttl,
        trust_domain: store.current().trust_domain.clone(),
    };
    remote_store(remote, RemoteOptions::default()).context("connecting to the certificate service")
}

async fn run_async(args: RunArgs, log: common::logging::LogHandle) -> anyhow::Result<()> {
    let (store, xds_synced) = config_source(&args)?;
    let certs = Arc::new(cert_store(&args, &store)?);
    if certs.is_remote() {
        certs.prefetch(&local_identities(&store, &args.node));
    } else {
        for id in local_identities(&store, &args.node) {
            certs.get(&id)?;
        }
    }
    let metrics = Arc::new(Metrics::new());
    // With capture installed, tunnels leave from the source pod's own address (the receiver
    // takes the client from the TCP peer); their replies reach ztunnel through the capture's
    // `socket transparent` rule. Without capture nothing steers those replies back.
    let original_source = args.capture == CaptureMode::Nft;
    let dialer: Dialer = Arc::new(move |src, addr| {
        Box::pin(socket::connect_from(src.filter(|_| original_source), addr))
    });
    let settings = H2Settings {
        handshake_timeout: args.handshake_timeout,
        ..H2Settings::default()
    };
    let hbone = HboneClient::new(certs.clone(), settings, PoolTimings::default(), dialer);
    hbone.spawn_pruner(POOL_PRUNE_INTERVAL);
    let _pool_follow = AbortOnDrop(follow_pool(store.clone(), hbone.clone()));
    let (drain, drain_watch) = Drain::new();
    let dns_proxy = args.dns_proxy_enabled();
    let mut own_ports = vec![
        args.outbound_addr.port(),
        args.inbound_plaintext_addr.port(),
        args.inbound_addr.port(),
    ];
    if dns_proxy {
        own_ports.push(args.dns_proxy_addr.port());
    }
    // Created on the main runtime: every DNS lookup runs here, whichever shard asks.
    let dns = Arc::new(common::dns_cache::DnsCache::from_resolv_conf(
        &args.resolv_conf,
    ));
    let _dns_refresher = AbortOnDrop(tokio::spawn(dns.clone().run_refresher()));
    let state = Arc::new(ProxyState::new(
        args.node.clone(),
        store.clone(),
        certs.clone(),
        hbone,
        metrics,
        settings,
        drain_watch,
        own_ports,
        dns,
    ));

    let node = args.node.clone();
    let _revalidator = common::revalidate::spawn_revalidator(
        store.clone(),
        state.live.clone(),
        move |snap, conn| proxy::revalidate::check(snap, &node, conn),
    );

    if args.capture == CaptureMode::Nft {
        socket::enable_request_migration();
    }
    // Bound before capture is installed: TPROXY needs the sockets to exist.
    let _dns_tasks = if dns_proxy {
        Some(start_dns_proxy(
            &args,
            store.clone(),
            state.metrics.dns.clone(),
        )?)
    } else {
        None
    };
    let outbound = socket::transparent_listener(args.outbound_addr)?;
    let inbound_plain = socket::transparent_listener(args.inbound_plaintext_addr)?;
    let inbound = socket::transparent_listener(args.inbound_addr)?;
    let ready = Arc::new(AtomicBool::new(false));
    let admin_state = Arc::new(AdminState {
        proxy: state.clone(),
        log,
        ready: ready.clone(),
    });
    let [admin_h, metrics_h, ready_h] = admin::handlers(admin_state);
    // SO_REUSEPORT like the data-plane listeners, so the next ztunnel can start beside this one.
    common::admin_http::spawn_reuse_port(
        "ztunnel-admin",
        vec![
            (args.admin_addr, admin_h),
            (args.metrics_addr, metrics_h),
            (args.readiness_addr, ready_h),
        ],
    )?;

    let base = CaptureSpec {
        dns_port: dns_proxy.then_some(args.dns_proxy_addr.port()),
        ..CaptureSpec::empty()
    };
    // Built only when wanted: a guard built and discarded would remove the rules at once.
    let guard = || {
        if args.remove_capture_on_exit {
            Some(CaptureGuard)
        } else {
            None
        }
    };
    let (_capture, _capture_follow) = match args.capture {
        CaptureMode::Nft if CaptureSpec::follows_mesh(&args.capture_args) => {
            // Pods come from the configuration: capture what the first complete snapshot
            // names, then follow it.
            if let Some(synced) = &xds_synced {
                while !synced.load(Ordering::Acquire) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let task = capture_follow::start(store.clone(), args.node.clone(), base, true).await?;
            (guard(), Some(AbortOnDrop(task)))
        }
        CaptureMode::Nft if dns_proxy => {
            // Pods from the command line; DNS opt-outs follow the configuration.
            let spec = CaptureSpec {
                dns_port: base.dns_port,
                ..CaptureSpec::from_args(&args.capture_args)?
            };
            let task = capture_follow::start(store.clone(), args.node.clone(), spec, false).await?;
            (guard(), Some(AbortOnDrop(task)))
        }
        CaptureMode::Nft => {
            let spec = CaptureSpec::from_args(&args.capture_args)?;
            capture::install(&spec)?;
            (guard(), None)
        }
        CaptureMode::None => (None, None),
    };

    let shards = Arc::new(common::shards::Shards::start(
        args.worker_threads.unwrap_or_else(default_shards),
        "ztunnel-worker",
    )?);
    let caps = Caps {
        connections: args.max_connections,
        per_source: args.max_connections_per_source,
        handshakes: args.max_concurrent_handshakes,
        handshakes_per_source: args.max_concurrent_handshakes_per_source,
        handshakes_waiting: args.max_waiting_handshakes,
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(proxy::serve(
        outbound,
        Admission::new("outbound", caps, state.metrics.shed.clone()),
        state.clone(),
        shards.clone(),
        proxy::outbound::handle,
    ));
    tasks.spawn(proxy::serve(
        inbound,
        Admission::new("inbound", caps, state.metrics.shed.clone()),
        state.clone(),
        shards.clone(),
        proxy::inbound::handle,
    ));
    tasks.spawn(proxy::serve(
        inbound_plain,
        Admission::new("inbound_plaintext", caps, state.metrics.shed.clone()),
        state.clone(),
        shards.clone(),
        proxy::inbound_passthrough::handle,
    ));
    tokio::spawn(rotate_certificates(
        store.clone(),
        certs.clone(),
        args.node.clone(),
        args.cert_ttl,
    ));
    if let Some(synced) = &xds_synced {
        // Ready only once the control plane's first answers are applied (as Istio's ztunnel).
        while !synced.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    ready.store(true, Ordering::Release);
    tracing::info!(
        node = %args.node,
        outbound = %args.outbound_addr,
        inbound = %args.inbound_addr,
        inbound_plaintext = %args.inbound_plaintext_addr,
        "ztunnel ready"
    );

    common::drain::shutdown_signal().await?;
    tracing::info!(timeout = ?args.drain_timeout, active = state.active_connections(), "draining");
    ready.store(false, Ordering::Release);
    drain.start();
    let deadline = common::duration::std_deadline(args.drain_timeout);
    while state.active_connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = state.active_connections();
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain deadline reached; closing the rest"
        );
    } else {
        tracing::info!("drained");
    }
    tasks.abort_all();
    if args.capture == CaptureMode::Nft && !args.remove_capture_on_exit {
        tracing::info!(
            "capture rules stay installed (fail closed until the next ztunnel takes them over)"
        );
    }
    Ok(())
}

/// Binds the DNS proxy's UDP socket and TCP listener and serves them on this (the main)
/// runtime; the tasks stop when the returned guards drop.
fn start_dns_proxy(
    args: &RunArgs,
    store: Arc<ConfigStore>,
    metrics: crate::dns_proxy::DnsMetrics,
) -> anyhow::Result<[AbortOnDrop; 2]> {
    use crate::dns_proxy::{forward::Forwarder, server, DnsProxy};
    let udp = server::udp_socket(args.dns_proxy_addr)?;
    let tcp = socket::transparent_listener(args.dns_proxy_addr)?;
    let forwarder = Forwarder::from_resolv_conf(&args.resolv_conf, args.dns_max_in_flight);
    let proxy = Arc::new(DnsProxy::new(
        store,
        args.dns_cluster_domain.clone(),
        forwarder,
        metrics,
    ));
    tracing::info!(addr = %args.dns_proxy_addr, "DNS proxy listening (udp, tcp)");
    Ok([
        AbortOnDrop(tokio::spawn(server::serve_udp(udp, proxy.clone()))),
        AbortOnDrop(tokio::spawn(server::serve_tcp(
            tcp,
            proxy,
            server::TcpLimits::default(),
        ))),
    ])
}

async fn rotate_certificates(
    store: Arc<ConfigStore>,
    certs: Arc<CertStore>,
    node: String,
    ttl: Duration,
) {
    let period = (ttl / 8).clamp(Duration::from_millis(200), Duration::from_secs(60));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let ids = local_identities(&store, &node);
        let rotated = certs.rotate_due(&ids);
        // New local workloads get their certificate before their first connection.
        certs.prefetch(&ids);
        if rotated > 0 {
            tracing::info!(rotated, "rotated workload certificates");
        }
    }
}

/// How often the HBONE pool forgets dead connections and empty keys.
const POOL_PRUNE_INTERVAL: Duration = Duration::from_secs(30);

/// On every configuration change, closes idle pooled HBONE connections whose source pod or
/// destination is no longer in the mesh (a departed pod's pool would otherwise live until the
/// idle timeout, and its key forever).
fn follow_pool(store: Arc<ConfigStore>, hbone: Arc<HboneClient>) -> tokio::task::JoinHandle<()> {
    let mut changes = store.subscribe();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let snap = store.current();
            let known = |ip: std::net::IpAddr| snap.workload_by_ip(ip).is_some();
            let closed = hbone.retain(|k| known(k.dst.ip()) && k.src_ip.is_none_or(known));
            if closed > 0 {
                tracing::debug!(
                    closed,
                    "closed idle HBONE connections of departed workloads"
                );
            }
        }
    })
}
