//! Circuit breaking (DestinationRule `connectionPool`): per cluster, HTTP/1.1 requests hold one
//! of `maxConnections` slots and up to `http1MaxPendingRequests` more may wait for one; HTTP/2
//! requests hold one of `http2MaxRequests`; concurrent retries are capped by `maxRetries`.
//! Overflow is answered 503 with response flag `UO`, as Envoy does.

use crate::upstream::UpstreamProtocol;
use common::l7::destination_rule::ConnectionPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

struct ClusterLimits {
    pool: ConnectionPool,
    h1: Arc<Semaphore>,
    h2: Arc<Semaphore>,
    waiting: AtomicU32,
    retries: Arc<AtomicU32>,
}

fn permits(n: u32) -> usize {
    (n as usize).min(Semaphore::MAX_PERMITS)
}

impl ClusterLimits {
    fn new(pool: &ConnectionPool) -> Self {
        ClusterLimits {
            pool: pool.clone(),
            h1: Arc::new(Semaphore::new(permits(pool.max_connections))),
            h2: Arc::new(Semaphore::new(permits(pool.http2_max_requests))),
            waiting: AtomicU32::new(0),
            retries: Arc::new(AtomicU32::new(0)),
        }
    }
}

/// Held while a request is admitted to its cluster.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    retries: Arc<AtomicU32>,
    max_retries: u32,
}

/// Held while a retry is in flight.
pub struct RetryToken(Arc<AtomicU32>);

impl Drop for RetryToken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admitted {
    /// A retry slot, or `None` when `maxRetries` retries are already in flight.
    pub fn retry(&self) -> Option<RetryToken> {
        let prev = self.retries.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max_retries {
            self.retries.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(RetryToken(self.retries.clone()))
    }
}

#[derive(Default)]
pub struct Limits {
    clusters: Mutex<HashMap<String, Arc<ClusterLimits>>>,
}

impl Limits {
    /// Forgets clusters with nothing admitted, queued or retrying (their state is the initial
    /// one, recreated on the next request): the map holds only clusters in use.
    pub fn prune(&self) -> usize {
        let mut map = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        let before = map.len();
        map.retain(|_, c| {
            Arc::strong_count(c) > 1
                || c.h1.available_permits() < permits(c.pool.max_connections)
                || c.h2.available_permits() < permits(c.pool.http2_max_requests)
                || c.waiting.load(Ordering::Acquire) > 0
                || c.retries.load(Ordering::Acquire) > 0
        });
        before - map.len()
    }

    fn cluster(&self, name: &str, pool: &ConnectionPool) -> Arc<ClusterLimits> {
        let mut map = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(name) {
            Some(c) if c.pool == *pool => c.clone(),
            _ => {
                let c = Arc::new(ClusterLimits::new(pool));
                map.insert(name.to_string(), c.clone());
                c
            }
        }
    }

    /// Admits a request to `cluster` or reports overflow.
    pub async fn admit(
        &self,
        cluster: &str,
        pool: &ConnectionPool,
        proto: UpstreamProtocol,
    ) -> Option<Admitted> {
        let c = self.cluster(cluster, pool);
        let done = |permit| Admitted {
            _permit: permit,
            retries: c.retries.clone(),
            max_retries: c.pool.max_retries,
        };
        match proto {
            UpstreamProtocol::H2c => c.h2.clone().try_acquire_owned().ok().map(done),
            UpstreamProtocol::Http1 => {
                if let Ok(p) = c.h1.clone().try_acquire_owned() {
                    return Some(done(p));
                }
                let queued = c.waiting.fetch_add(1, Ordering::AcqRel);
                if queued >= c.pool.http1_max_pending_requests {
                    c.waiting.fetch_sub(1, Ordering::AcqRel);
                    return None;
                }
                let permit = c.h1.clone().acquire_owned().await.ok();
                c.waiting.fetch_sub(1, Ordering::AcqRel);
                permit.map(done)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max_connections: u32, pending: u32, h2: u32, retries: u32) -> ConnectionPool {
        ConnectionPool {
            max_connections,
            http1_max_pending_requests: pending,
            http2_max_requests: h2,
            max_retries: retries,
            ..ConnectionPool::default()
        }
    }

    #[tokio::test]
    async fn http1_overflow_beyond_connections_plus_pending() {
        let l = Arc::new(Limits::default());
        let p = pool(1, 1, 10, 3);
        let first = l.admit("c", &p, UpstreamProtocol::Http1).await.unwrap();
        // One may wait...
        let l2 = l.clone();
        let p2 = p.clone();
        let waiter =
            tokio::spawn(
                async move { l2.admit("c", &p2, UpstreamProtocol::Http1).await.is_some() },
            );
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // ...the next overflows.
        assert!(l.admit("c", &p, UpstreamProtocol::Http1).await.is_none());
        drop(first);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn http2_requests_and_retries_are_capped() {
        let l = Limits::default();
        let p = pool(10, 10, 1, 1);
        let a = l.admit("c", &p, UpstreamProtocol::H2c).await.unwrap();
        assert!(l.admit("c", &p, UpstreamProtocol::H2c).await.is_none());
        let r = a.retry().unwrap();
        assert!(a.retry().is_none());
        drop(r);
        assert!(a.retry().is_some());
    }

    /// A cluster's limits stay while a request holds them and are forgotten afterwards.
    #[tokio::test]
    async fn prune_forgets_idle_clusters_only() {
        let l = Limits::default();
        let p = pool(2, 0, 2, 1);
        let held = l.admit("busy", &p, UpstreamProtocol::Http1).await.unwrap();
        drop(l.admit("idle", &p, UpstreamProtocol::H2c).await.unwrap());
        assert_eq!(l.prune(), 1);
        assert_eq!(l.clusters.lock().unwrap().len(), 1);
        drop(held);
        assert_eq!(l.prune(), 1);
        assert!(l.clusters.lock().unwrap().is_empty());
    }
}
