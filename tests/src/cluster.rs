//! The mesh on a (fake) Kubernetes cluster: the fake API server listening inside node n1's
//! namespace, the real `controller` binary beside it (watching that API, serving xDS and
//! certificates on 10.0.0.1:15012 with a certificate from the mesh CA it created), and real
//! ztunnels on every node in cluster mode (`--xds-address`, `--ca-address`, projected-token
//! files, capture following the mesh — no `--pod-iface`, no `--config`, no CA key on a node).
//! Kubernetes objects are built here in the shapes an API server returns; the test plays the
//! kubelet and the endpoint-slice controller by creating them.

use crate::netns::Netns;
use crate::testdir::TestDir;
use crate::topology::{Pod, Topology};
use crate::ztunnel::{binary, ZtunnelOpts, ZtunnelProcess};
use anyhow::{bail, Context, Result};
use fake_apiserver::{FakeApiServer, TokenInfo};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Where the controller serves gRPC (node n1's address).
pub const CONTROLLER_ADDR: &str = "10.0.0.1:15012";
/// The controller's `/metrics` and `/healthz/ready` (n1's loopback).
pub const MONITORING_PORT: u16 = 15014;
/// The fake API server inside n1 (loopback).
pub const API_PORT: u16 = 6443;
/// Namespace of the mesh's own components.
pub const SYSTEM_NS: &str = "ambient-system";

/// The `controller` binary next to the test executable (or `$CONTROLLER_BIN`).
pub fn controller_bin() -> Result<PathBuf> {
    binary("controller", "CONTROLLER_BIN")
}

/// A running `controller`; stopped (SIGTERM, then SIGKILL) on drop, log printed on a panic.
pub struct ControllerProcess {
    child: Option<Child>,
    ns: Netns,
    log: PathBuf,
}

impl ControllerProcess {
    /// Starts the controller in `ns` against the API at `127.0.0.1:API_PORT` and waits until it
    /// reports ready (index synced, CA loaded, gRPC bound).
    pub async fn start(ns: &Netns, log: &Path, extra: &[&str]) -> Result<ControllerProcess> {
        let bin = controller_bin()?;
        let file = std::fs::File::create(log).with_context(|| log.display().to_string())?;
        let api = format!("http://127.0.0.1:{API_PORT}");
        let monitoring = format!("127.0.0.1:{MONITORING_PORT}");
        let mut cmd = ns.command(&[bin.to_str().context("non-UTF-8 path")?]);
        cmd.args([
            "--api-server",
            &api,
            "--xds-addr",
            "0.0.0.0:15012",
            "--monitoring-addr",
            &monitoring,
            "--serving-san",
            "10.0.0.1",
            "--namespace",
            SYSTEM_NS,
            "--pod-name",
            "controller-0",
        ])
        .args(extra)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
        let child = cmd.spawn().context("spawning the controller")?;
        let mut c = ControllerProcess {
            child: Some(child),
            ns: ns.handle(),
            log: log.to_path_buf(),
        };
        c.wait_ready(Duration::from_secs(60)).await?;
        Ok(c)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let addr = ([127, 0, 0, 1], MONITORING_PORT).into();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("controller exited ({status}); log:\n{}", self.log_tail(40));
            }
            if let Ok((200, _)) =
                crate::admin::http_request(&self.ns, "GET", addr, "/healthz/ready").await
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "controller not ready after {timeout:?}; log:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The controller's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The controller's Prometheus text.
    pub async fn metrics(&self) -> Result<String> {
        let addr = ([127, 0, 0, 1], MONITORING_PORT).into();
        Ok(
            crate::admin::http_request(&self.ns, "GET", addr, "/metrics")
                .await?
                .1,
        )
    }

    pub fn log_tail(&self, n: usize) -> String {
        crate::support::log_tail(&self.log, n)
    }

    /// Waits for a log line containing every needle.
    pub async fn wait_log_line(&self, needles: &[&str], timeout: Duration) -> Result<String> {
        crate::support::wait_log_line(&self.log, "controller", needles, timeout).await
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- controller log ({}), last lines ----\n{}\n----",
                self.log.display(),
                self.log_tail(60)
            );
        }
        crate::support::terminate(self.child.take(), "controller");
    }
}

/// A Namespace object, ambient when `ambient`.
pub fn namespace(name: &str, ambient: bool) -> Value {
    let mut labels = BTreeMap::new();
    if ambient {
        labels.insert("istio.io/dataplane-mode", "ambient");
    }
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": labels}})
}

/// A running, ready Pod as the kubelet reports it.
pub fn pod(ns: &str, name: &str, sa: &str, node: &str, ip: &str, labels: &[(&str, &str)]) -> Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                     "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

/// A ClusterIP Service with one TCP port.
pub fn service(
    ns: &str,
    name: &str,
    vip: &str,
    port: u16,
    target: u16,
    selector: &[(&str, &str)],
) -> Value {
    let selector: BTreeMap<&str, &str> = selector.iter().copied().collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": selector,
                 "ports": [{"name": "tcp", "port": port, "targetPort": target, "protocol": "TCP"}]}
    })
}

/// The EndpointSlice of `service` with `endpoints` as (pod name, ip, node), all ready.
pub fn endpoint_slice(
    ns: &str,
    service: &str,
    port: u16,
    endpoints: &[(&str, &str, &str)],
) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(pod, ip, node)| {
            json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": node, "targetRef": {"kind": "Pod", "namespace": ns, "name": pod}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-slice"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}]
    })
}

/// The small ambient application of the two-node topology: namespace `default` (ambient),
/// pods `a` (n1, `sa-a`, app=client) and `b` (n2, `sa-b`, app=server), Service `echo`
/// (10.96.0.10:8080 → 9000) in front of `b` with its EndpointSlice.
pub fn echo_app() -> Vec<Value> {
    vec![
        namespace("default", true),
        pod(
            "default",
            "a",
            "sa-a",
            "n1",
            "10.244.1.2",
            &[("app", "client")],
        ),
        pod(
            "default",
            "b",
            "sa-b",
            "n2",
            "10.244.2.2",
            &[("app", "server")],
        ),
        service(
            "default",
            "echo",
            "10.96.0.10",
            8080,
            9000,
            &[("app", "server")],
        ),
        endpoint_slice("default", "echo", 9000, &[("b", "10.244.2.2", "n2")]),
    ]
}

/// The whole cluster-mode mesh of one test. Fields drop in declaration order: ztunnels, then
/// the controller, then the API server, then the namespaces.
pub struct ClusterMesh {
    pub ztunnels: Vec<ZtunnelProcess>,
    pub controller: ControllerProcess,
    pub api: FakeApiServer,
    pub topo: Topology,
    /// The mesh root the controller published (`istio-ca-root-cert`), as a file.
    pub root: PathBuf,
    pub dir: TestDir,
}

impl ClusterMesh {
    /// Builds the two-node topology, serves the fake API in n1, applies `objects` (plus the
    /// system namespace, nodes and one ztunnel pod per node with a bound token), starts the
    /// controller, reads the root it publishes, and starts a ztunnel on every node.
    pub async fn start(label: &str, objects: Vec<Value>) -> Result<ClusterMesh> {
        ClusterMesh::start_in(label, Topology::two_nodes()?, objects).await
    }

    /// Like [`ClusterMesh::start`] on a topology of the test's own (nodes `n1`, `n2`).
    pub async fn start_in(label: &str, topo: Topology, objects: Vec<Value>) -> Result<ClusterMesh> {
        let mut mesh = ClusterMesh::start_control_plane(label, topo, objects).await?;
        for i in 0..mesh.topo.nodes.len() {
            let node = &mesh.topo.nodes[i];
            let opts = mesh.ztunnel_opts(&node.name)?;
            let log = mesh.dir.join(&format!("ztunnel-{}.log", node.name));
            let zt = ZtunnelProcess::start(&node.ns, &opts, &log).await?;
            mesh.ztunnels.push(zt);
        }
        Ok(mesh)
    }

    /// Everything of [`ClusterMesh::start_in`] but the ztunnels: the fake API with the system
    /// namespace, nodes, one host-network ztunnel pod per node (token registered), `objects`,
    /// the controller and its published root. Node agents (ours or Istio's) are started by the
    /// caller.
    pub async fn start_control_plane(
        label: &str,
        topo: Topology,
        objects: Vec<Value>,
    ) -> Result<ClusterMesh> {
        let dir = TestDir::new(label)?;
        let n1 = topo.node("n1");
        let listener = n1.ns.tcp_listener(([127, 0, 0, 1], API_PORT).into())?;
        let api = FakeApiServer::serve(listener)?;
        api.create(namespace(SYSTEM_NS, false))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for node in &topo.nodes {
            api.create(json!({"apiVersion": "v1", "kind": "Node",
                              "metadata": {"name": node.name}}))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            // The ztunnel pod of this node (host network: the node's address).
            let zt = format!("ztunnel-{}", node.name);
            let mut p = pod(
                SYSTEM_NS,
                &zt,
                "ztunnel",
                &node.name,
                &node.ip.to_string(),
                &[],
            );
            p["spec"]["hostNetwork"] = json!(true);
            api.create(p).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            api.add_token(&token_of(&zt), token_info(SYSTEM_NS, "ztunnel", &zt));
        }
        for o in objects {
            api.create(o).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        let controller = ControllerProcess::start(&n1.ns, &dir.join("controller.log"), &[]).await?;
        let root = dir.join("root-cert.pem");
        let pem = wait_root(&api, Duration::from_secs(20)).await?;
        std::fs::write(&root, pem)?;
        Ok(ClusterMesh {
            ztunnels: Vec::new(),
            controller,
            api,
            topo,
            root,
            dir,
        })
    }

    /// The control-plane flags of a proxy running as pod `pod` (its token written to a file):
    /// xDS and certificates from the controller, verified with the published root.
    pub fn control_plane_args(&self, pod: &str) -> Result<Vec<String>> {
        let token = self.dir.join(&format!("{pod}.token"));
        std::fs::write(&token, token_of(pod))?;
        let url = format!("https://{CONTROLLER_ADDR}");
        let root = self.root.display().to_string();
        Ok(vec![
            "--xds-address".into(),
            url.clone(),
            "--xds-root-ca".into(),
            root.clone(),
            "--ca-address".into(),
            url,
            "--ca-root".into(),
            root,
            "--token-file".into(),
            token.display().to_string(),
        ])
    }

    /// Cluster-mode options for the ztunnel on `node`: its token file, the published root,
    /// the controller's address for xDS and certificates, capture following the mesh.
    pub fn ztunnel_opts(&self, node: &str) -> Result<ZtunnelOpts> {
        Ok(ZtunnelOpts {
            node: node.to_string(),
            config: None,
            ca_dir: None,
            capture: true,
            pod_ifaces: Vec::new(),
            pod_cidrs: Vec::new(),
            extra_args: self.control_plane_args(&format!("ztunnel-{node}"))?,
        })
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.topo.pod(name)
    }

    pub fn ztunnel(&self, node: &str) -> &ZtunnelProcess {
        self.ztunnels
            .iter()
            .find(|z| z.node == node)
            .unwrap_or_else(|| panic!("no ztunnel on {node}"))
    }

    /// Creates an object in the fake API.
    pub fn create(&self, obj: Value) -> Result<Value> {
        self.api.create(obj).map_err(|e| anyhow::anyhow!("{e:?}"))
    }

    /// Replaces an object in the fake API.
    pub fn update(&self, obj: Value) -> Result<Value> {
        self.api.update(obj).map_err(|e| anyhow::anyhow!("{e:?}"))
    }

    /// Deletes an object from the fake API.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Result<()> {
        self.api
            .delete(api_version, kind, ns, name)
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    }
}

/// The literal bearer token of pod `name` (the fake API server reviews it).
pub fn token_of(pod: &str) -> String {
    format!("token-{pod}")
}

/// What TokenReview says about a projected token of pod `pod` running as `ns/sa`.
pub fn token_info(ns: &str, sa: &str, pod: &str) -> TokenInfo {
    let mut extra = BTreeMap::new();
    extra.insert(
        "authentication.kubernetes.io/pod-name".to_string(),
        vec![pod.to_string()],
    );
    extra.insert(
        "authentication.kubernetes.io/pod-uid".to_string(),
        vec![format!("uid-{ns}-{pod}")],
    );
    TokenInfo {
        username: format!("system:serviceaccount:{ns}:{sa}"),
        uid: format!("sa-uid-{ns}-{sa}"),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
        ],
        audiences: vec!["istio-ca".into()],
        extra,
        expired: false,
    }
}

/// The mesh root the controller publishes in `istio-ca-root-cert` (system namespace), once it
/// does, within `timeout`.
pub async fn wait_root(api: &FakeApiServer, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(cm) = api.get("v1", "ConfigMap", Some(SYSTEM_NS), "istio-ca-root-cert") {
            if let Some(pem) = cm["data"]["root-cert.pem"].as_str() {
                return Ok(pem.to_string());
            }
        }
        if Instant::now() > deadline {
            bail!("the controller published no istio-ca-root-cert in {SYSTEM_NS}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
