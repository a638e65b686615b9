//! The benchmark's world, built with the e2e harness: the two-node topology with the standard
//! mesh config, the ztunnel pair (TPROXY capture on both nodes), the equivalent Envoy HBONE
//! client/server pair, and the large config (10 000 workloads, 1 000 services) for the memory
//! figures.

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;
use tests::config::MeshConfig;
use tests::envoy::{EnvoyBuilder, EnvoyProcess, HboneClient, HboneServer};
use tests::mesh::Mesh;
use tests::testdir::TestDir;
use tests::topology::Topology;
use tests::ztunnel::{Ca, ZtunnelOpts, ZtunnelProcess};

pub const SA_A: &str = "spiffe://cluster.local/ns/default/sa/sa-a";
pub const SA_B: &str = "spiffe://cluster.local/ns/default/sa/sa-b";
/// Where node 1's Envoy accepts the client's plain TCP.
pub const ENVOY_CLIENT_LISTEN: &str = "10.0.0.1:15011";
/// Where node 2's Envoy terminates HBONE (a plain listener on the node's own address).
pub const ENVOY_SERVER_LISTEN: &str = "10.0.0.2:15008";

/// Builds the topology, CA and config file; no proxy runs yet.
pub fn world(config: &MeshConfig) -> Result<Mesh> {
    let dir = TestDir::new("bench")?;
    let ca = Ca::init(&dir.join("ca"))?;
    let config_path = dir.join("mesh.yaml");
    config.write(&config_path)?;
    let mesh = Mesh {
        ztunnels: Vec::new(),
        topo: Topology::two_nodes()?,
        ca,
        config_path,
        dir,
    };
    // Many short connections: reuse TIME_WAIT ports and widen the ephemeral range everywhere
    // a connection starts (pods, and nodes for the proxies' upstream legs).
    for ns in [
        &mesh.node("n1").ns,
        &mesh.node("n2").ns,
        &mesh.pod("a").ns,
        &mesh.pod("b").ns,
    ] {
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    }
    Ok(mesh)
}

/// Starts a capturing ztunnel on both nodes.
pub async fn start_ztunnels(mesh: &mut Mesh, config: &MeshConfig) -> Result<()> {
    for name in ["n1", "n2"] {
        let node = mesh.node(name);
        let opts = mesh.opts_for(node, config);
        let log = mesh.dir.join(&format!("ztunnel-{name}.log"));
        let zt = ZtunnelProcess::start(&node.ns, &opts, &log).await?;
        mesh.ztunnels.push(zt);
    }
    Ok(())
}

/// Stops the ztunnels and takes the mesh off both nodes: ztunnel leaves its capture rules
/// installed when it exits (fail closed), so they are removed explicitly with `ztunnel capture
/// remove`, as an operator would, before the next contender runs uncaptured.
pub fn stop_ztunnels(mesh: &mut Mesh) -> Result<()> {
    mesh.ztunnels.clear();
    let bin = tests::ztunnel::ztunnel_bin()?;
    let bin = bin.to_str().context("non-UTF-8 ztunnel path")?;
    for name in ["n1", "n2"] {
        let ns = &mesh.node(name).ns;
        ns.exec(&[bin, "capture", "remove"])
            .with_context(|| format!("ztunnel capture remove on {name}"))?;
        let left = ns.exec_output(&["nft", "list", "table", "inet", "ztunnel"])?;
        if left.status.success() {
            bail!("ztunnel capture remove left the nft table on {name}");
        }
    }
    Ok(())
}

/// The process ids of the running ztunnels.
pub fn ztunnel_pids(mesh: &Mesh) -> Result<Vec<u32>> {
    mesh.ztunnels
        .iter()
        .map(|z| z.pid().context("ztunnel not running"))
        .collect()
}

/// Envoy on node 2 terminating HBONE into pod b, and Envoy on node 1 tunnelling plain TCP from
/// its listener to it, with the same identities our ztunnels would use.
pub async fn start_envoys(mesh: &Mesh, backend: SocketAddr) -> Result<Vec<EnvoyProcess>> {
    let server_certs = mesh.ca.issue(SA_B, &mesh.dir.join("envoy-n2-certs"))?;
    let client_certs = mesh.ca.issue(SA_A, &mesh.dir.join("envoy-n1-certs"))?;
    let server = EnvoyBuilder::new("envoy-n2")
        .hbone_server(HboneServer {
            listen: ENVOY_SERVER_LISTEN.parse()?,
            certs: server_certs,
            backend,
            client_san_prefix: "spiffe://cluster.local/".into(),
        })
        .start(&mesh.node("n2").ns, mesh.dir.path())
        .await?;
    let client = EnvoyBuilder::new("envoy-n1")
        .hbone_client(HboneClient {
            listen: ENVOY_CLIENT_LISTEN.parse()?,
            certs: client_certs,
            upstream: ENVOY_SERVER_LISTEN.parse()?,
            authority: backend.to_string(),
            server_identity: SA_B.into(),
            headers: Vec::new(),
        })
        .start(&mesh.node("n1").ns, mesh.dir.path())
        .await?;
    Ok(vec![client, server])
}

/// `envoy --version`, shortened to the version field.
pub fn envoy_version() -> String {
    let run = || -> Result<String> {
        let out = std::process::Command::new(tests::envoy::envoy_bin()?)
            .arg("--version")
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // `<path>  version: <sha>/<version>/Clean/RELEASE/BoringSSL`
        Ok(text
            .split("version:")
            .nth(1)
            .and_then(|v| v.split('/').nth(1))
            .unwrap_or("?")
            .to_string())
    };
    run().unwrap_or_else(|e| format!("? ({e:#})"))
}

/// Number of synthetic workloads and services in [`large_config`].
pub const LARGE_WORKLOADS: usize = 10_000;
pub const LARGE_SERVICES: usize = 1_000;

/// `base` plus 10 000 HBONE workloads on 100 other nodes in 20 namespaces and 1 000 services
/// (two ports each) with 10 endpoints each, in the same local-config form.
pub fn large_config(base: &MeshConfig) -> String {
    let mut y = base.render();
    let services_at = y.find("\nservices:").expect("rendered config has services") + 1;
    let (workloads, services) = y.split_at_mut(services_at);
    let (mut workloads, mut services) = (workloads.to_string(), services.to_string());
    let host = |s: usize| format!("svc-{s}.ns-{}.svc.cluster.local", s % 20);
    for w in 0..LARGE_WORKLOADS {
        let s = w % LARGE_SERVICES;
        let _ = writeln!(
            workloads,
            "- {{uid: bench-w-{w}, name: bench-w-{w}, namespace: ns-{ns}, serviceAccount: sa-svc-{s}, \
             workloadIps: [10.{b}.{c}.{d}], protocol: HBONE, node: node-{node}, \
             labels: {{\"app\": \"svc-{s}\", \"version\": \"v1\"}}, \
             services: {{\"ns-{ns}/{h}\": {{80: 8080, 443: 8443}}}}}}",
            ns = s % 20,
            b = 200 + w / 65536,
            c = (w / 256) % 256,
            d = w % 256,
            node = w % 100,
            h = host(s),
        );
    }
    for s in 0..LARGE_SERVICES {
        let _ = writeln!(
            services,
            "- {{name: svc-{s}, namespace: ns-{ns}, hostname: {h}, vips: [\"/10.100.{c}.{d}\"], ports: {{80: 8080, 443: 8443}}}}",
            ns = s % 20,
            h = host(s),
            c = s / 256,
            d = s % 256,
        );
    }
    y = workloads + &services;
    y
}

/// Resident memory of ztunnel in three situations, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct LargeConfigMemory {
    /// The running node-1 ztunnel after the file grew to the large config and was reloaded.
    pub reloaded: u64,
    /// Its peak (VmHWM) over its whole life, reload included.
    pub reloaded_peak: u64,
    /// A fresh ztunnel started on the large config (no traffic).
    pub fresh: u64,
}

/// Loads the large config into node 1's running ztunnel (by rewriting its file), then starts a
/// fresh ztunnel on it in an unused pod namespace, and reads their resident memory. Memory is
/// read before anything asks for `/config_dump` (serialising 11 000 entries would inflate it);
/// the dump only confirms afterwards that the config really was loaded.
pub async fn large_config_memory(mesh: &Mesh, base: &MeshConfig) -> Result<LargeConfigMemory> {
    let text = large_config(base);
    let last = format!("bench-w-{}", LARGE_WORKLOADS - 1);
    let zt = mesh.ztunnel("n1");
    let reloads = |log: &str| log.matches("configuration reloaded").count();
    let before = reloads(&zt.log());
    mesh.write_config_text(&text)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = zt.log();
        if reloads(&log) > before {
            break;
        }
        if log.contains("configuration rejected") || std::time::Instant::now() > deadline {
            bail!("the large config was not loaded:\n{}", zt.log_tail(10));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the old snapshot and the reload's temporaries go.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = zt.pid().context("ztunnel n1 not running")?;
    let reloaded = crate::procfs::rss_bytes(pid)?;
    let reloaded_peak = crate::procfs::peak_rss_bytes(pid)?;
    zt.wait_config(Duration::from_secs(30), |d| d.contains(&last))
        .await?;

    let path = mesh.dir.join("large.yaml");
    std::fs::write(&path, &text)?;
    let opts = ZtunnelOpts {
        node: "n1".into(),
        config: Some(path),
        ca_dir: Some(mesh.ca.dir.clone()),
        capture: false,
        pod_ifaces: Vec::new(),
        pod_cidrs: Vec::new(),
        extra_args: Vec::new(),
    };
    // Pod c is idle: its namespace has free ports for a second, non-capturing ztunnel.
    let log = mesh.dir.join("ztunnel-large.log");
    let fresh_zt = ZtunnelProcess::start(&mesh.pod("c").ns, &opts, &log).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh = crate::procfs::rss_bytes(fresh_zt.pid().context("not running")?)?;
    fresh_zt
        .wait_config(Duration::from_secs(30), |d| d.contains(&last))
        .await?;
    Ok(LargeConfigMemory {
        reloaded,
        reloaded_peak,
        fresh,
    })
}
