//! The controller's pipeline: watcher events into the sans-IO [`Index`], its change feed into
//! the ADS server ([`crate::publish::to_xds`]). Events already queued are folded into one batch
//! before publishing; the ADS server debounces further and encodes nothing twice.

use crate::events::plan::{VerdictTracker, Verdicts};
use crate::index::{Index, IndexEvent, Kind};
use crate::watch::watched_kinds;
use crate::xds::XdsServer;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// Runs until the event channel closes. `synced` turns true once every watched kind
/// ([`crate::watch::watched_kinds`]) has been listed once (or found not served): answering a
/// reconnecting proxy from a half-loaded index would tell it to remove everything not yet
/// listed — for AuthorizationPolicies, a window in which a DENY is not enforced.
pub async fn feed(
    rx: mpsc::Receiver<IndexEvent>,
    index: Index,
    xds: XdsServer,
    synced: watch::Sender<bool>,
) {
    let (verdicts, _) = watch::channel(Arc::new(Verdicts::new()));
    feed_with_verdicts(rx, index, xds, synced, verdicts).await
}

/// [`feed`], also publishing the rejected (and once rejected, now accepted) Istio objects after
/// each batch that changed them, for the Event writer ([`crate::events::run`]).
pub async fn feed_with_verdicts(
    mut rx: mpsc::Receiver<IndexEvent>,
    mut index: Index,
    xds: XdsServer,
    synced: watch::Sender<bool>,
    verdicts: watch::Sender<Arc<Verdicts>>,
) {
    let mut tracker = VerdictTracker::default();
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
        if tracker.update(index.rejections(), |k| index.istio_object(k)) {
            verdicts.send_replace(Arc::new(tracker.verdicts().clone()));
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
