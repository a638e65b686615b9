//! A running mesh for one test: topology + CA + config file + one ztunnel per node, wired so that
//! the mesh pods (HBONE workloads in the config) are captured on their node. Dropping it stops
//! the ztunnels first, then deletes the namespaces, then the scratch directory.

use crate::config::{MeshConfig, Service, Workload};
use crate::testdir::TestDir;
use crate::topology::{Node, Pod, Topology};
use crate::ztunnel::{Ca, ZtunnelOpts, ZtunnelProcess};
use anyhow::{Context, Result};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The echo service VIP of [`standard_config`].
pub const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The echo service port.
pub const ECHO_PORT: u16 = 8080;
/// The echo service's target port on its endpoints.
pub const ECHO_TARGET_PORT: u16 = 9000;

/// `10.96.0.10:8080`.
pub fn echo_vip() -> SocketAddr {
    (ECHO_VIP, ECHO_PORT).into()
}

/// The standard mesh on [`Topology::two_nodes`]: `a` (sa-a, app=client) and `c` (sa-c) on n1,
/// `b` (sa-b, app=server) on n2 as the endpoint of service `echo` (10.96.0.10:8080 → 9000).
/// Pod `d` is not in the mesh.
pub fn standard_config() -> MeshConfig {
    MeshConfig::new()
        .workload(Workload::hbone("a", "10.244.1.2", "n1").label("app", "client"))
        .workload(Workload::hbone("c", "10.244.1.3", "n1").label("app", "other"))
        .workload(Workload::hbone("b", "10.244.2.2", "n2").label("app", "server"))
        .service(Service::new("echo", "10.96.0.10").port(ECHO_PORT, ECHO_TARGET_PORT))
        .endpoint("b", "echo")
}

/// Topology, CA, config file and ztunnels of one test. Fields drop in declaration order.
pub struct Mesh {
    pub ztunnels: Vec<ZtunnelProcess>,
    pub topo: Topology,
    pub ca: Ca,
    pub config_path: PathBuf,
    pub dir: TestDir,
}

impl Mesh {
    /// Builds [`Topology::two_nodes`] and starts the mesh with `config`.
    pub async fn two_nodes(label: &str, config: &MeshConfig) -> Result<Mesh> {
        Mesh::start(label, Topology::two_nodes()?, config).await
    }

    /// Creates the CA, writes `config`, and starts a capturing ztunnel on every node of `topo`.
    pub async fn start(label: &str, topo: Topology, config: &MeshConfig) -> Result<Mesh> {
        Mesh::start_with(label, topo, config, |_, _| {}).await
    }

    /// Like [`Mesh::two_nodes`], but `customize` may change each node's ztunnel options first
    /// (e.g. push `--cert-ttl 2s` onto `extra_args`).
    pub async fn two_nodes_with(
        label: &str,
        config: &MeshConfig,
        customize: impl FnMut(&Node, &mut ZtunnelOpts),
    ) -> Result<Mesh> {
        Mesh::start_with(label, Topology::two_nodes()?, config, customize).await
    }

    /// Like [`Mesh::start`], with `customize` applied to each node's ztunnel options.
    pub async fn start_with(
        label: &str,
        topo: Topology,
        config: &MeshConfig,
        mut customize: impl FnMut(&Node, &mut ZtunnelOpts),
    ) -> Result<Mesh> {
        let dir = TestDir::new(label)?;
        let ca = Ca::init(&dir.join("ca"))?;
        let config_path = dir.join("mesh.yaml");
        config.write(&config_path)?;
        let mut mesh = Mesh {
            ztunnels: Vec::new(),
            topo,
            ca,
            config_path,
            dir,
        };
        for node in &mesh.topo.nodes {
            let mut opts = mesh.opts_for(node, config);
            customize(node, &mut opts);
            let log = mesh.dir.join(&format!("ztunnel-{}.log", node.name));
            let zt = ZtunnelProcess::start(&node.ns, &opts, &log).await?;
            mesh.ztunnels.push(zt);
        }
        Ok(mesh)
    }

    /// ztunnel options for `node`: capture the pods that are HBONE workloads of this node.
    pub fn opts_for(&self, node: &Node, config: &MeshConfig) -> ZtunnelOpts {
        let mesh_pods: Vec<&Pod> = self
            .topo
            .pods
            .iter()
            .filter(|p| p.node == node.name)
            .filter(|p| {
                config
                    .get_workload(&p.name)
                    .is_some_and(|w| w.hbone && w.node == node.name)
            })
            .collect();
        ZtunnelOpts {
            node: node.name.clone(),
            config: Some(self.config_path.clone()),
            ca_dir: Some(self.ca.dir.clone()),
            capture: true,
            // `iface=ip`: ztunnel drops TCP from a pod interface with any other source.
            pod_ifaces: mesh_pods
                .iter()
                .map(|p| format!("{}={}", p.host_if, p.ip))
                .collect(),
            pod_cidrs: mesh_pods.iter().map(|p| format!("{}/32", p.ip)).collect(),
            extra_args: Vec::new(),
        }
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.topo.pod(name)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.topo.node(name)
    }

    /// The ztunnel of node `name`.
    pub fn ztunnel(&self, node: &str) -> &ZtunnelProcess {
        self.ztunnels
            .iter()
            .find(|z| z.node == node)
            .unwrap_or_else(|| panic!("no ztunnel on {node}"))
    }

    /// Mutable access to the ztunnel of node `name`.
    pub fn ztunnel_mut(&mut self, node: &str) -> &mut ZtunnelProcess {
        self.ztunnels
            .iter_mut()
            .find(|z| z.node == node)
            .unwrap_or_else(|| panic!("no ztunnel on {node}"))
    }

    /// Rewrites the config file atomically (ztunnel reloads it by itself).
    pub fn write_config(&self, config: &MeshConfig) -> Result<()> {
        config.write(&self.config_path)
    }

    /// Rewrites the config file with raw text.
    pub fn write_config_text(&self, text: &str) -> Result<()> {
        crate::config::write_atomic(&self.config_path, text)
    }

    /// Waits until every ztunnel's `/config_dump` satisfies `pred`.
    pub async fn wait_config(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<()> {
        for z in &self.ztunnels {
            z.wait_config(timeout, &pred)
                .await
                .with_context(|| format!("waiting for config on {}", z.node))?;
        }
        Ok(())
    }
}

/// Raises RLIMIT_NOFILE of the test process (and of processes it spawns afterwards) to at
/// least `n`, raising the hard limit too (the tests run as root). Returns the new soft limit.
pub fn raise_nofile_limit(n: u64) -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    if soft >= n {
        return Ok(soft);
    }
    setrlimit(Resource::RLIMIT_NOFILE, n, hard.max(n))
        .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, hard.min(n), hard))
        .context("setrlimit")?;
    Ok(getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?.0)
}
