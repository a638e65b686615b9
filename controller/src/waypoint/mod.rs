//! The waypoint controller: for every Gateway of class `istio-waypoint` (canonical, as current
//! Istio) or `istio-mesh` (the early form: no listeners, `istio.io/service-account`), it
//! server-side applies (field manager `ambient-controller`, label
//! `gateway.istio.io/managed: istio.io-mesh-controller`, controller owner reference to the
//! Gateway) a ServiceAccount, a Deployment running the `waypoint` binary, a Service, and by
//! default a HorizontalPodAutoscaler and a PodDisruptionBudget, and writes the Gateway's status.
//! It runs on the Lease holder only ([`run`]) and creates the two GatewayClasses if missing.
//!
//! Rules:
//! - An existing object that lacks our label (or is ours for another Gateway) is never adopted
//!   or overwritten: the Gateway gets `Accepted=False` (reason `ResourceConflict`) saying which,
//!   and nothing is applied. Exception: the early form's service account is the served
//!   workloads' own, so an existing unlabelled one is used as is (a missing one is created).
//! - Bad parameters: `Accepted=False` (reason `InvalidParameters`) naming the annotation or
//!   ConfigMap key, and nothing is applied (objects from the last good parameters stay).
//! - Objects we no longer want (HPA or PDB turned off, a renamed Deployment) are deleted, and a
//!   deleted Gateway's objects are deleted explicitly too (not left to garbage collection),
//!   unlike istiod, which leaves a disabled HPA behind.
//! - `Programmed` is False (`AddressNotUsable`) until the Service exists and a waypoint pod is
//!   Ready; then True, with `status.addresses` = the Service's cluster IPs and its hostname.
//!
//! Names: Deployment, Service, HPA and PDB are named after the Gateway (`istio-waypoint`) or
//! `<gateway>-waypoint` (`istio-mesh`, whose Gateway is usually named like the application
//! Service it serves), or `gateway.istio.io/name-override`. The ServiceAccount is the Gateway's
//! name, `gateway.istio.io/service-account`, or (early form) `istio.io/service-account`.
//!
//! Parameters (Gateway annotations; the same keys without prefix, e.g. `min-replicas`, in the
//! ConfigMap named by `spec.infrastructure.parametersRef`; annotations win):
//!
//! | annotation | ConfigMap key | default |
//! |---|---|---|
//! | `autoscaling.ambient.io/enabled` | `autoscaling-enabled` | `true` |
//! | `autoscaling.ambient.io/min-replicas` | `min-replicas` | `2` |
//! | `autoscaling.ambient.io/max-replicas` | `max-replicas` | `10` (at least min) |
//! | `autoscaling.ambient.io/target-cpu-utilization` | `target-cpu-utilization` | `80` (%) |
//! | `ambient.io/pod-disruption-budget` | `pod-disruption-budget` | `true` (maxUnavailable 1) |
//! | `ambient.io/cpu-request` | `cpu-request` | `100m` |
//! | `ambient.io/memory-request` | `memory-request` | `128Mi` |
//!
//! Files: [`gateway`] (the Gateway, classes, names, labels), [`params`] (parameters),
//! [`render`] (pure templates), [`status`] (pure status), [`reconcile`] (one Gateway against
//! the API server), [`queue`] (keys, debounce, backoff), [`runner`] (watchers and the loop).

pub mod gateway;
pub mod params;
pub mod queue;
pub mod reconcile;
pub mod render;
pub mod runner;
pub mod status;

#[cfg(test)]
mod render_tests;

pub use params::{WaypointConfig, WaypointParams};
pub use render::{render, Rendered};

/// Field manager of every write of the controller.
pub const FIELD_MANAGER: &str = "ambient-controller";

/// Runs the waypoint controller whenever `leader` is true (this replica holds the Lease),
/// stopping it when the lease is lost; returns when the election ends (sender dropped).
pub async fn run(
    client: kube::Client,
    config: WaypointConfig,
    mut leader: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if leader.wait_for(|l| *l).await.is_err() {
            return;
        }
        tracing::info!("waypoint controller: this replica holds the lease");
        let task = tokio::spawn(runner::lead(client.clone(), config.clone()));
        let election_ended = leader.wait_for(|l| !*l).await.is_err();
        task.abort();
        let _ = task.await;
        if election_ended {
            return;
        }
        tracing::info!("waypoint controller: lease lost, stopped");
    }
}
