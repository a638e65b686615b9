//! Housekeeping of the waypoint's per-endpoint and per-client state: every
//! [`INTERVAL`] and after each configuration change, the maps that would otherwise only grow
//! (HBONE pool keys, idle upstream connections keyed by endpoint × client, outlier state,
//! in-flight counters, per-cluster limits) forget what is idle, at rest, or about endpoints
//! that left the mesh. Idle connections to departed pods are closed; busy ones finish first.

use crate::app::State;
use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How often housekeeping runs without a configuration change.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// Runs [`run_once`] on a timer and on every configuration change until the state is gone.
pub fn spawn(state: &Arc<State>) -> tokio::task::JoinHandle<()> {
    let weak: Weak<State> = Arc::downgrade(state);
    let mut changes = state.config.subscribe();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = changes.changed() => if changed.is_err() { return },
            }
            let Some(state) = weak.upgrade() else { return };
            run_once(&state);
        }
    })
}

/// What one pass forgot or closed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub hbone_connections: usize,
    pub upstream_connections: usize,
    pub outlier_endpoints: usize,
    pub in_flight_counters: usize,
    pub cluster_limits: usize,
}

/// One pass against the current configuration.
pub fn run_once(state: &State) -> Swept {
    let snap = state.config.current();
    let known = |ip: IpAddr| snap.workload_by_ip(ip).is_some();
    let max_idle = common::l7::destination_rule::ConnectionPool::default()
        .idle_timeout
        .0;
    let swept = Swept {
        hbone_connections: state.hbone.retain(|k| known(k.dst.ip())),
        upstream_connections: state.upstreams.prune(max_idle, |a| known(a.ip())),
        outlier_endpoints: state.outliers.prune(|a| known(a.ip()), Instant::now()),
        in_flight_counters: state.balancers.prune(),
        cluster_limits: state.limits.prune(),
    };
    if swept != Swept::default() {
        tracing::debug!(?swept, "housekeeping");
    }
    swept
}
