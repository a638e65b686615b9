//! Shared helpers of the waypoint controller tests: a fake API server with the controller
//! running against it (as Lease holder unless told otherwise), polling, and kubelet play.
#![allow(dead_code)]

use controller::waypoint::WaypointConfig;
use fake_apiserver::FakeApiServer;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub const GW: &str = "gateway.networking.k8s.io/v1";
pub const KINDS: [(&str, &str); 5] = [
    ("v1", "ServiceAccount"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
];

pub struct Harness {
    pub server: FakeApiServer,
    pub leader: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Harness {
    /// A server without garbage collection (so what disappears was deleted by the controller)
    /// and the controller, leading when `leading`.
    pub async fn start(leading: bool, resync: Duration) -> Harness {
        let server = FakeApiServer::start().await;
        server.set_garbage_collection(false);
        for ns in ["default", "bookinfo"] {
            server
                .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
                .expect("namespace");
        }
        let (leader, rx) = watch::channel(leading);
        let config = WaypointConfig {
            image: "registry.example/waypoint:test".into(),
            resync,
            ..WaypointConfig::default()
        };
        let task = tokio::spawn(controller::waypoint::run(server.client(), config, rx));
        Harness {
            server,
            leader,
            task,
        }
    }

    pub fn get(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Option<Value> {
        self.server.get(api_version, kind, Some(ns), name)
    }

    pub fn gateway(&self, ns: &str, name: &str) -> Option<Value> {
        self.get(GW, "Gateway", ns, name)
    }

    /// The Gateway's condition of `kind`.
    pub fn condition(&self, ns: &str, name: &str, kind: &str) -> Option<Value> {
        let gw = self.gateway(ns, name)?;
        gw["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == kind)
            .cloned()
    }

    /// Every waypoint object kind present under `name` in `ns`.
    pub fn present(&self, ns: &str, name: &str, sa: &str) -> Vec<&'static str> {
        KINDS
            .iter()
            .filter(|(api, kind)| {
                let n = if *kind == "ServiceAccount" { sa } else { name };
                self.get(api, kind, ns, n).is_some()
            })
            .map(|(_, kind)| *kind)
            .collect()
    }

    /// Plays the kubelet: a Ready pod of the waypoint of Gateway `gw`.
    pub fn ready_pod(&self, ns: &str, gw: &str, pod: &str) {
        self.server
            .create(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": ns,
                             "labels": {"gateway.networking.k8s.io/gateway-name": gw}},
                "spec": {"containers": [{"name": "waypoint", "image": "x"}]},
                "status": {"phase": "Running", "podIP": "10.244.1.9",
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }))
            .expect("pod");
    }
}

/// Polls `cond` every 25 ms until it holds; fails the test after `secs` seconds.
pub async fn eventually(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The canonical waypoint Gateway.
pub fn waypoint_gateway(ns: &str, name: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": GW, "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    })
}

/// The seed's early-form Gateway, read from disk unchanged.
pub fn seed_gateway_yaml() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/scenarios/waypoint-gateway.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (shared/ must sit beside the checkout)",
            path.display()
        )
    })
}
