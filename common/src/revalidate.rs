//! Live connections under a changing policy: every authorized connection registers the inputs
//! of its authorization and a cancel handle in a [`Registry`]; when the configuration snapshot
//! is swapped, [`spawn_revalidator`] walks the registry, re-evaluates each entry against the new
//! snapshot and cancels those no longer allowed (one log line each, counted in a metric).
//!
//! The hot path pays one short, sharded lock to register and one to deregister; all evaluation
//! happens on the revalidator's task, once per snapshot swap.

use crate::config::watch::ConfigStore;
use crate::snapshot::Snapshot;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

/// Independent locks, so registering connections on different shards rarely contend.
const SHARDS: usize = 32;

struct Slot<T> {
    inputs: T,
    cancel: oneshot::Sender<String>,
}

type Shard<T> = Mutex<HashMap<u64, Slot<T>>>;

/// The live connections of one proxy, with what each was authorized on.
pub struct Registry<T> {
    shards: Box<[Shard<T>]>,
    next: AtomicU64,
    /// Connections closed because a new snapshot no longer allows them.
    pub revoked: Counter,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next: AtomicU64::new(0),
            revoked: Counter::default(),
        }
    }
}

/// Removes the connection from the registry when dropped (the connection ended).
pub struct Registration<T> {
    registry: Arc<Registry<T>>,
    id: u64,
}

impl<T> Drop for Registration<T> {
    fn drop(&mut self) {
        self.registry.shard(self.id).remove(&self.id);
    }
}

/// Resolves with the reason once the connection's authorization is revoked.
pub struct Revoked(oneshot::Receiver<String>);

impl Revoked {
    /// Waits for revocation; never resolves if the connection is never revoked.
    pub async fn wait(self) -> String {
        match self.0.await {
            Ok(reason) => reason,
            Err(_) => std::future::pending().await,
        }
    }
}

impl<T> Registry<T> {
    pub fn new() -> Arc<Self> {
        Arc::new(Registry::default())
    }

    /// A registry counting revocations in `revoked` (registered with a metrics registry).
    pub fn with_counter(revoked: Counter) -> Arc<Self> {
        Arc::new(Registry {
            revoked,
            ..Registry::default()
        })
    }

    fn shard(&self, id: u64) -> MutexGuard<'_, HashMap<u64, Slot<T>>> {
        self.shards[(id % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a live connection authorized on `inputs`. Keep the registration for the life
    /// of the connection and race its work against [`Revoked::wait`].
    pub fn register(self: &Arc<Self>, inputs: T) -> (Registration<T>, Revoked) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (cancel, rx) = oneshot::channel();
        self.shard(id).insert(id, Slot { inputs, cancel });
        (
            Registration {
                registry: self.clone(),
                id,
            },
            Revoked(rx),
        )
    }

    /// Live registered connections.
    pub fn len(&self) -> usize {
        (0..SHARDS as u64).map(|i| self.shard(i).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-evaluates every entry: those for which `check` returns a reason are removed and
    /// cancelled with it. Returns how many were cancelled.
    pub fn sweep(&self, mut check: impl FnMut(&T) -> Option<String>) -> usize {
        let mut cancelled = 0;
        for i in 0..SHARDS as u64 {
            let revoked: Vec<(Slot<T>, String)> = {
                let mut shard = self.shard(i);
                let ids: Vec<(u64, String)> = shard
                    .iter()
                    .filter_map(|(id, slot)| check(&slot.inputs).map(|why| (*id, why)))
                    .collect();
                ids.into_iter()
                    .filter_map(|(id, why)| shard.remove(&id).map(|s| (s, why)))
                    .collect()
            };
            for (slot, why) in revoked {
                // The connection may have ended meanwhile; then nobody is listening.
                if slot.cancel.send(why).is_ok() {
                    cancelled += 1;
                    self.revoked.inc();
                }
            }
        }
        cancelled
    }
}

/// Re-evaluates `registry` with `check` after every snapshot swap of `store`. `check` returns
/// why a connection is no longer allowed (and should log it), or `None` to keep it.
pub fn spawn_revalidator<T, F>(
    store: Arc<ConfigStore>,
    registry: Arc<Registry<T>>,
    check: F,
) -> tokio::task::JoinHandle<()>
where
    T: Send + 'static,
    F: Fn(&Snapshot, &T) -> Option<String> + Send + 'static,
{
    let mut changes = store.subscribe();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let snap = store.current();
            let closed = registry.sweep(|t| check(&snap, t));
            if closed > 0 {
                tracing::info!(
                    closed,
                    generation = store.generation(),
                    "closed live connections the new configuration no longer allows"
                );
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn sweep_cancels_only_denied_and_forgets_ended() {
        let reg: Arc<Registry<u32>> = Registry::new();
        let (keep, keep_rx) = reg.register(1);
        let (deny, deny_rx) = reg.register(2);
        let (ended, _ended_rx) = reg.register(2);
        drop(ended);
        assert_eq!(reg.len(), 2);
        let n = reg.sweep(|v| (*v == 2).then(|| format!("deny {v}")));
        assert_eq!(n, 1);
        assert_eq!(reg.revoked.get(), 1);
        assert_eq!(deny_rx.wait().await, "deny 2");
        assert_eq!(reg.len(), 1);
        drop(deny);
        // The kept connection is never woken.
        let woke = tokio::time::timeout(Duration::from_millis(50), keep_rx.wait()).await;
        assert!(woke.is_err());
        drop(keep);
        assert!(reg.is_empty());
    }

    #[tokio::test]
    async fn revalidator_runs_on_snapshot_swap() {
        let store = Arc::new(ConfigStore::default());
        let reg: Arc<Registry<String>> = Registry::new();
        let (_r, rx) = reg.register("w".to_string());
        let task = spawn_revalidator(store.clone(), reg.clone(), |snap, name: &String| {
            snap.workloads
                .iter()
                .any(|w| &w.name == name)
                .then(|| format!("{name} appeared"))
        });
        let snap = crate::config::load_str(
            "workloads:\n- {name: w, workloadIps: [\"10.0.0.1\"]}\n",
            "x",
        )
        .expect("valid");
        store.replace(snap);
        let why = tokio::time::timeout(Duration::from_secs(5), rx.wait())
            .await
            .expect("revoked after the swap");
        assert_eq!(why, "w appeared");
        task.abort();
    }
}
