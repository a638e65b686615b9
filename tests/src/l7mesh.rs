//! A mesh with a service behind a waypoint: node `n1` with the client pods, node `n2` with the
//! service's endpoint pods and the waypoint pod (last on n2). The service's config entry names
//! the waypoint (`waypoint: {destination: "/<waypoint IP>", hboneMtlsPort: 15006}`), the waypoint
//! is an HBONE workload with service account `waypoint`, and its pod is *not* captured by n2's
//! ztunnel (like Istio's `ambient.istio.io/redirection: disabled`). Dropping the mesh stops the
//! waypoint first, then the ztunnels, then deletes the namespaces and the scratch directory.
//!
//! ```ignore
//! // Three endpoints of echo (10.96.0.10:8080 → 9000), clients a and c:
//! let mesh = L7Mesh::builder("rr").endpoints(&["b", "d", "e"]).start().await?;
//! let servers = mesh.start_http_servers(HttpMode::Auto)?;
//! let mut client = Http1Client::connect(&mesh.pod("a").ns, mesh.vip()).await?;
//! // The demoapp canary shape: 5 endpoints with version labels v1.0 ×3 / v1.1 ×2.
//! let mesh = L7Mesh::demoapp_canary("canary").start().await?;
//! ```

use crate::config::{MeshConfig, Service, Workload};
use crate::http_apps::{http_server, HttpMode, HttpServer};
use crate::mesh::Mesh;
use crate::topology::{Pod, Topology};
use crate::waypoint::{WaypointOpts, WaypointProcess, WAYPOINT_PORT};
use crate::ztunnel::{ZtunnelOpts, ZtunnelProcess};
use anyhow::{Context, Result};
use std::net::{Ipv4Addr, SocketAddr};

/// The default service VIP.
pub const L7_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The default service port.
pub const L7_PORT: u16 = 8080;
/// The default target port on the endpoints.
pub const L7_TARGET_PORT: u16 = 9000;
/// Workload (and pod) name of the waypoint.
pub const WAYPOINT_NAME: &str = "waypoint";
/// Service account of the waypoint.
pub const WAYPOINT_SA: &str = "waypoint";

/// A pod to create: name and workload labels.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

impl PodSpec {
    pub fn new(name: &str, labels: &[(&str, &str)]) -> PodSpec {
        PodSpec {
            name: name.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// Describes an [`L7Mesh`]. Defaults: clients `a` (app=client) and `c` (app=other) on n1;
/// endpoint `b` (app=echo) on n2; service `echo` at 10.96.0.10:8080 → 9000; waypoint pod last
/// on n2.
#[derive(Debug, Clone)]
pub struct L7MeshBuilder {
    label: String,
    clients: Vec<PodSpec>,
    endpoints: Vec<PodSpec>,
    /// Pods on n2 that are mesh workloads but not endpoints of the service.
    others: Vec<PodSpec>,
    service_name: String,
    vip: Ipv4Addr,
    ports: Vec<(u16, u16)>,
    documents: Vec<String>,
    waypoint_args: Vec<String>,
    sniff_timeout: Option<String>,
    app_protocols: Vec<(u16, String)>,
    /// The endpoints name the waypoint too (traffic to their own IPs goes through it).
    workload_waypoint: bool,
    /// More services, each with its endpoint pods (from `others`).
    extra_services: Vec<(Service, Vec<String>)>,
    /// The HBONE port the config names for the waypoint (`hboneMtlsPort`).
    waypoint_port: u16,
}

impl L7MeshBuilder {
    /// Replaces the client pods (on n1) with plain pods named `names` (label app=client).
    pub fn clients(mut self, names: &[&str]) -> Self {
        self.clients = names
            .iter()
            .map(|n| PodSpec::new(n, &[("app", "client")]))
            .collect();
        self
    }

    /// Replaces the client pods with `pods`.
    pub fn client_pods(mut self, pods: Vec<PodSpec>) -> Self {
        self.clients = pods;
        self
    }

    /// Replaces the endpoints with pods named `names` (label `app=<service name>`).
    pub fn endpoints(mut self, names: &[&str]) -> Self {
        let app = self.service_name.clone();
        self.endpoints = names
            .iter()
            .map(|n| PodSpec::new(n, &[("app", app.as_str())]))
            .collect();
        self
    }

    /// Replaces the endpoints with `pods` (their labels as given).
    pub fn endpoint_pods(mut self, pods: Vec<PodSpec>) -> Self {
        self.endpoints = pods;
        self
    }

    /// Adds a mesh pod on n2 that is not an endpoint of the service.
    pub fn other_pod(mut self, pod: PodSpec) -> Self {
        self.others.push(pod);
        self
    }

    /// Renames the service (and its default endpoint label) and sets its VIP.
    pub fn service(mut self, name: &str, vip: Ipv4Addr) -> Self {
        let old = std::mem::replace(&mut self.service_name, name.to_string());
        for ep in &mut self.endpoints {
            for (k, v) in &mut ep.labels {
                if k == "app" && *v == old {
                    *v = name.to_string();
                }
            }
        }
        self.vip = vip;
        self
    }

    /// Replaces the service's ports (`port → targetPort`).
    pub fn ports(mut self, ports: &[(u16, u16)]) -> Self {
        self.ports = ports.to_vec();
        self
    }

    /// Adds a service port.
    pub fn port(mut self, port: u16, target: u16) -> Self {
        self.ports.push((port, target));
        self
    }

    /// Appends an Istio document (VirtualService, DestinationRule, …) to the config file.
    pub fn document(mut self, yaml: &str) -> Self {
        self.documents.push(yaml.to_string());
        self
    }

    /// Extra `waypoint run` arguments.
    pub fn waypoint_arg(mut self, arg: &str) -> Self {
        self.waypoint_args.push(arg.to_string());
        self
    }

    /// Declares the application protocol of service port `port` (`appProtocols`).
    pub fn app_protocol(mut self, port: u16, proto: &str) -> Self {
        self.app_protocols.push((port, proto.to_string()));
        self
    }

    /// Makes the waypoint the endpoints' own too: traffic addressed to an endpoint's pod IP
    /// (not the service VIP) goes through it.
    pub fn workload_waypoint(mut self) -> Self {
        self.workload_waypoint = true;
        self
    }

    /// Adds another service whose endpoints are the named pods (added with
    /// [`L7MeshBuilder::other_pod`]).
    pub fn extra_service(mut self, service: Service, endpoints: &[&str]) -> Self {
        let eps = endpoints.iter().map(|e| e.to_string()).collect();
        self.extra_services.push((service, eps));
        self
    }

    /// Names `port` as the waypoint's HBONE port in the config (Istio's ztunnel uses 15008).
    pub fn waypoint_port(mut self, port: u16) -> Self {
        self.waypoint_port = port;
        self
    }

    /// `--sniff-timeout` of the waypoint.
    pub fn sniff_timeout(mut self, t: &str) -> Self {
        self.sniff_timeout = Some(t.to_string());
        self
    }

    /// IP of the `i`-th pod on n2 (endpoints first, then other pods, then the waypoint).
    fn n2_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 2, (i + 2) as u8)
    }

    /// The waypoint's pod IP.
    pub fn waypoint_ip(&self) -> Ipv4Addr {
        Self::n2_ip(self.endpoints.len() + self.others.len())
    }

    /// The config this mesh starts with.
    pub fn config(&self) -> MeshConfig {
        let mut cfg = MeshConfig::new();
        for (i, c) in self.clients.iter().enumerate() {
            let mut w = Workload::hbone(&c.name, Ipv4Addr::new(10, 244, 1, (i + 2) as u8), "n1");
            for (k, v) in &c.labels {
                w = w.label(k, v);
            }
            cfg = cfg.workload(w);
        }
        for (i, p) in self.endpoints.iter().chain(&self.others).enumerate() {
            let mut w = Workload::hbone(&p.name, Self::n2_ip(i), "n2");
            for (k, v) in &p.labels {
                w = w.label(k, v);
            }
            if self.workload_waypoint && i < self.endpoints.len() {
                w = w.waypoint(self.waypoint_ip(), self.waypoint_port);
            }
            cfg = cfg.workload(w);
        }
        cfg = cfg.workload(
            Workload::hbone(WAYPOINT_NAME, self.waypoint_ip(), "n2")
                .service_account(WAYPOINT_SA)
                .label("gateway.networking.k8s.io/gateway-name", WAYPOINT_NAME),
        );
        let mut svc = Service::new(&self.service_name, &self.vip.to_string())
            .waypoint(self.waypoint_ip(), self.waypoint_port);
        for (p, t) in &self.ports {
            svc = svc.port(*p, *t);
        }
        for (p, proto) in &self.app_protocols {
            svc = svc.app_protocol(*p, proto);
        }
        cfg = cfg.service(svc);
        for ep in &self.endpoints {
            cfg = cfg.endpoint(&ep.name, &self.service_name);
        }
        for (svc, eps) in &self.extra_services {
            cfg = cfg.service(svc.clone());
            for ep in eps {
                cfg = cfg.endpoint(ep, &svc.name);
            }
        }
        for d in &self.documents {
            cfg = cfg.document(d);
        }
        cfg
    }

    /// Builds the topology, starts the ztunnels (not capturing the waypoint pod) and the
    /// waypoint, and waits until all are ready.
    pub async fn start(self) -> Result<L7Mesh> {
        let config = self.config();
        let client_names: Vec<&str> = self.clients.iter().map(|p| p.name.as_str()).collect();
        let mut n2_names: Vec<&str> = self
            .endpoints
            .iter()
            .chain(&self.others)
            .map(|p| p.name.as_str())
            .collect();
        n2_names.push(WAYPOINT_NAME);
        let topo = Topology::builder()
            .node("n1", &client_names)
            .node("n2", &n2_names)
            .build()?;
        let wp_pod = topo.pod(WAYPOINT_NAME);
        anyhow::ensure!(
            wp_pod.ip == self.waypoint_ip(),
            "waypoint pod got {}, config says {}",
            wp_pod.ip,
            self.waypoint_ip()
        );
        let (wp_if, wp_cidr) = (wp_pod.host_if.clone(), format!("{}/32", wp_pod.ip));
        let mesh = Mesh::start_with(&self.label, topo, &config, |_, opts: &mut ZtunnelOpts| {
            // The waypoint speaks mTLS itself: its node's ztunnel must leave it alone.
            opts.pod_ifaces
                .retain(|i| i.split('=').next() != Some(wp_if.as_str()));
            opts.pod_cidrs.retain(|c| *c != wp_cidr);
        })
        .await?;
        let mut opts = WaypointOpts::new(
            &mesh.config_path,
            &mesh.ca.dir,
            &format!("default/{WAYPOINT_NAME}"),
        );
        opts.sniff_timeout = self.sniff_timeout.clone();
        opts.extra_args = self.waypoint_args.clone();
        let log = mesh.dir.join("waypoint.log");
        let waypoint = WaypointProcess::start(&mesh.pod(WAYPOINT_NAME).ns, &opts, &log)
            .await
            .context("starting the waypoint")?;
        Ok(L7Mesh {
            waypoint: Some(waypoint),
            mesh,
            config,
            endpoints: self.endpoints.iter().map(|p| p.name.clone()).collect(),
            clients: self.clients.iter().map(|p| p.name.clone()).collect(),
            service_name: self.service_name,
            vip: self.vip,
            ports: self.ports,
        })
    }
}

/// A running mesh with one service behind a waypoint. Fields drop in declaration order.
pub struct L7Mesh {
    /// `None` after [`L7Mesh::stop_waypoint`].
    pub waypoint: Option<WaypointProcess>,
    pub mesh: Mesh,
    /// The config the mesh started with (extend it and [`L7Mesh::write_config`] to reload).
    pub config: MeshConfig,
    /// Endpoint pod names, in IP order.
    pub endpoints: Vec<String>,
    /// Client pod names (n1).
    pub clients: Vec<String>,
    pub service_name: String,
    pub vip: Ipv4Addr,
    /// `(port, targetPort)` of the service.
    pub ports: Vec<(u16, u16)>,
}

impl L7Mesh {
    /// The default shape (see [`L7MeshBuilder`]); `label` names the scratch directory.
    pub fn builder(label: &str) -> L7MeshBuilder {
        L7MeshBuilder {
            label: label.to_string(),
            clients: vec![
                PodSpec::new("a", &[("app", "client")]),
                PodSpec::new("c", &[("app", "other")]),
            ],
            endpoints: vec![PodSpec::new("b", &[("app", "echo")])],
            others: Vec::new(),
            service_name: "echo".to_string(),
            vip: L7_VIP,
            ports: vec![(L7_PORT, L7_TARGET_PORT)],
            documents: Vec::new(),
            waypoint_args: Vec::new(),
            sniff_timeout: None,
            app_protocols: Vec::new(),
            workload_waypoint: false,
            extra_services: Vec::new(),
            waypoint_port: WAYPOINT_PORT,
        }
    }

    /// The demoapp canary shape: service `demoapp` (10.96.0.20:80 → 8080) with five endpoints
    /// labelled `app=demoapp` and `version` v1.0 (`demo-v10-0`…`2`) or v1.1 (`demo-v11-0`,
    /// `demo-v11-1`); clients `a` and `c` on n1.
    pub fn demoapp_canary(label: &str) -> L7MeshBuilder {
        let mut eps = Vec::new();
        for i in 0..3 {
            eps.push(PodSpec::new(
                &format!("demo-v10-{i}"),
                &[("app", "demoapp"), ("version", "v1.0")],
            ));
        }
        for i in 0..2 {
            eps.push(PodSpec::new(
                &format!("demo-v11-{i}"),
                &[("app", "demoapp"), ("version", "v1.1")],
            ));
        }
        L7Mesh::builder(label)
            .service("demoapp", Ipv4Addr::new(10, 96, 0, 20))
            .ports(&[(80, 8080)])
            .endpoint_pods(eps)
    }

    /// `<VIP>:<first service port>`.
    pub fn vip(&self) -> SocketAddr {
        (self.vip, self.ports[0].0).into()
    }

    /// `<VIP>:<port>`.
    pub fn vip_port(&self, port: u16) -> SocketAddr {
        (self.vip, port).into()
    }

    /// `<name>.default.svc.cluster.local`.
    pub fn hostname(&self) -> String {
        format!("{}.default.svc.cluster.local", self.service_name)
    }

    /// Envoy-style cluster name of the default route: `outbound|<port>||<hostname>`.
    pub fn cluster(&self, port: u16) -> String {
        format!("outbound|{port}||{}", self.hostname())
    }

    /// The running waypoint (panics after [`L7Mesh::stop_waypoint`]).
    pub fn waypoint(&self) -> &WaypointProcess {
        self.waypoint.as_ref().expect("waypoint stopped")
    }

    /// Mutable access to the waypoint.
    pub fn waypoint_mut(&mut self) -> &mut WaypointProcess {
        self.waypoint.as_mut().expect("waypoint stopped")
    }

    /// Stops the waypoint (SIGTERM) and keeps nothing but its log file.
    pub fn stop_waypoint(&mut self) {
        if let Some(mut wp) = self.waypoint.take() {
            wp.stop();
        }
    }

    /// The waypoint pod.
    pub fn waypoint_pod(&self) -> &Pod {
        self.mesh.pod(WAYPOINT_NAME)
    }

    /// The waypoint's SPIFFE identity.
    pub fn waypoint_identity(&self) -> String {
        format!("spiffe://cluster.local/ns/default/sa/{WAYPOINT_SA}")
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.mesh.pod(name)
    }

    /// The ztunnel of node `node`.
    pub fn ztunnel(&self, node: &str) -> &ZtunnelProcess {
        self.mesh.ztunnel(node)
    }

    /// Starts the test HTTP server on every endpoint, on the first port's target port, each
    /// answering with its pod name. Same order as [`L7Mesh::endpoints`].
    pub fn start_http_servers(&self, mode: HttpMode) -> Result<Vec<HttpServer>> {
        self.start_http_servers_on(self.ports[0].1, mode)
    }

    /// Like [`L7Mesh::start_http_servers`] on `port`.
    pub fn start_http_servers_on(&self, port: u16, mode: HttpMode) -> Result<Vec<HttpServer>> {
        self.endpoints
            .iter()
            .map(|ep| {
                http_server(
                    &self.pod(ep).ns,
                    SocketAddr::from(([0, 0, 0, 0], port)),
                    ep,
                    mode,
                )
            })
            .collect()
    }

    /// Rewrites the config file (both the ztunnels and the waypoint reload it).
    pub fn write_config(&self, config: &MeshConfig) -> Result<()> {
        self.mesh.write_config(config)
    }
}
