//! The state every proxy listener reads: the config snapshot store, certificates, the HBONE
//! connection pool, metrics, the drain signal and the count of live connections.

use crate::metrics::Metrics;
use crate::proxy::revalidate::Authorized;
use common::config::watch::ConfigStore;
use common::dns_cache::DnsCache;
use common::drain::DrainWatch;
use common::hbone::client::HboneClient;
use common::hbone::H2Settings;
use common::identity::store::CertStore;
use common::revalidate::Registry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub struct ProxyState {
    pub node: String,
    pub config: Arc<ConfigStore>,
    pub certs: Arc<CertStore>,
    pub hbone: Arc<HboneClient>,
    pub metrics: Arc<Metrics>,
    pub settings: H2Settings,
    pub drain: DrainWatch,
    /// Ports of ztunnel's own listeners: a captured connection to one of them is a loop.
    pub own_ports: Vec<u16>,
    /// Live connections this node authorized, re-checked on every snapshot swap.
    pub live: Arc<Registry<Authorized>>,
    /// Answers for DNS-resolved ServiceEntries, shared by the shards.
    pub dns: Arc<DnsCache>,
    round_robin: Mutex<HashMap<(String, u16), usize>>,
    active: Arc<AtomicUsize>,
}

/// Held for the life of one proxied connection; the drain waits for all of them.
pub struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ProxyState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        config: Arc<ConfigStore>,
        certs: Arc<CertStore>,
        hbone: Arc<HboneClient>,
        metrics: Arc<Metrics>,
        settings: H2Settings,
        drain: DrainWatch,
        own_ports: Vec<u16>,
        dns: Arc<DnsCache>,
    ) -> Self {
        ProxyState {
            node,
            config,
            certs,
            hbone,
            metrics: metrics.clone(),
            settings,
            drain,
            live: Registry::with_counter(metrics.revoked.clone()),
            own_ports,
            dns,
            round_robin: Mutex::new(HashMap::new()),
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Next round-robin index for a service port with `n` endpoints.
    pub fn next_index(&self, service_key: &str, port: u16, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        let mut rr = self.round_robin.lock().unwrap_or_else(|p| p.into_inner());
        let slot = rr.entry((service_key.to_string(), port)).or_insert(0);
        let i = *slot % n;
        *slot = slot.wrapping_add(1);
        i
    }

    pub fn track(&self) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.active.clone())
    }

    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}
