//! The controller's pipeline: watcher events into the sans-IO [`Index`], its change feed into
//! the ADS server ([`crate::publish::to_xds`]). Events already queued are folded into one batch
//! before publishing; the ADS server debounces further and encodes nothing twice.

use crate::index::{Index, IndexEvent, Kind};
use crate::watch::watched_kinds;
use crate::xds::XdsServer;
use std::collections::BTreeSet;
use tokio::sync::{mpsc, watch};

/// Runs until the event channel closes. `synced` turns true once every watched kind
/// ([`crate::watch::watched_kinds`]) has been listed once (or found not served): answering a
/// reconnecting proxy from a half-loaded index would tell it to remove everything not yet
/// listed — for AuthorizationPolicies, a window in which a DENY is not enforced.
pub async fn feed(
    mut rx: mpsc::Receiver<IndexEvent>,
    mut index: Index,
    xds: XdsServer,
    synced: watch::Sender<bool>,
) {
    let mut listed: BTreeSet<Kind> = BTreeSet::new();
    let required = watched_kinds();
    while let Some(ev) = rx.recv().await {
        let mut batch = vec![ev];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 4096 {
                break;
            }
        }
        for ev in batch {
            if let IndexEvent::Synced(kind) = &ev {
                listed.insert(*kind);
            }
            index.handle(ev);
        }
        let changes = index.take_changes();
        if !changes.is_empty() {
            xds.publish(crate::publish::to_xds(&changes));
        }
        if !*synced.borrow() && required.iter().all(|k| listed.contains(k)) {
            tracing::info!(
                workloads = index.workloads().len(),
                services = index.services().len(),
                "initial lists applied; serving xDS"
            );
            let _ = synced.send(true);
        }
    }
}
