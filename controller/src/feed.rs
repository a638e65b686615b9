//! The controller's pipeline: watcher events into the sans-IO [`Index`], its change feed into
//! the ADS server ([`crate::publish::to_xds`]). Events already queued are folded into one batch
//! before publishing; the ADS server debounces further and encodes nothing twice.

use crate::index::{Index, IndexEvent, Kind};
use crate::xds::XdsServer;
use std::collections::BTreeSet;
use tokio::sync::{mpsc, watch};

/// The kinds whose first complete list must be in before the feed is served: answering a
/// reconnecting proxy from a half-loaded index would tell it to remove everything not yet
/// listed.
pub const REQUIRED_KINDS: [Kind; 4] = [
    Kind::Namespace,
    Kind::Pod,
    Kind::Service,
    Kind::EndpointSlice,
];

/// Runs until the event channel closes. `synced` turns true once every [`REQUIRED_KINDS`] kind
/// has been listed once.
pub async fn feed(
    mut rx: mpsc::Receiver<IndexEvent>,
    mut index: Index,
    xds: XdsServer,
    synced: watch::Sender<bool>,
) {
    let mut listed: BTreeSet<Kind> = BTreeSet::new();
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
        if !*synced.borrow() && REQUIRED_KINDS.iter().all(|k| listed.contains(k)) {
            tracing::info!(
                workloads = index.workloads().len(),
                services = index.services().len(),
                "initial lists applied; serving xDS"
            );
            let _ = synced.send(true);
        }
    }
}
