//! The ADS server's Prometheus metrics: responses pushed and NACKs received per type, push
//! latency (change published → response handed to the transport), connected clients, cached
//! resources per type. The lead serves [`Metrics::encode`] (or its own registry) on :15020.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Mutex;

/// Label set: the resource type (the type URL without `type.googleapis.com/`).
pub type TypeLabels = Vec<(&'static str, String)>;

fn labels(type_url: &str) -> TypeLabels {
    let short = type_url.rsplit('/').next().unwrap_or(type_url);
    vec![("type", short.to_string())]
}

fn latency_histogram() -> Histogram {
    // 1 ms … ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    pushes: Family<TypeLabels, Counter>,
    nacks: Family<TypeLabels, Counter>,
    nacked_resources: Family<TypeLabels, Counter>,
    push_latency: Family<TypeLabels, Histogram, fn() -> Histogram>,
    connected: Gauge,
    resources: Family<TypeLabels, Gauge>,
    /// Set when the metrics own their registry ([`Metrics::standalone`]).
    registry: Option<Mutex<Registry>>,
}

impl Metrics {
    /// Registers the metrics in `registry` (prefix `xds_`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            pushes: Family::default(),
            nacks: Family::default(),
            nacked_resources: Family::default(),
            push_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            connected: Gauge::default(),
            resources: Family::default(),
            registry: None,
        };
        let r = registry.sub_registry_with_prefix("xds");
        r.register(
            "pushes",
            "DeltaDiscoveryResponses sent, by resource type",
            m.pushes.clone(),
        );
        r.register(
            "nacks",
            "DeltaDiscoveryResponses rejected by a client (NACK), by resource type",
            m.nacks.clone(),
        );
        r.register(
            "nacked_resources",
            "Resources named in clients' NACKs (one NACK may name several), by resource type",
            m.nacked_resources.clone(),
        );
        r.register(
            "push_latency_seconds",
            "Time from a change being published to the response carrying it being sent",
            m.push_latency.clone(),
        );
        r.register(
            "connected_clients",
            "Open delta ADS streams",
            m.connected.clone(),
        );
        r.register(
            "resources",
            "Resources in the cache, by type",
            m.resources.clone(),
        );
        m
    }

    /// Metrics with a registry of their own (see [`Metrics::encode`]).
    pub fn standalone() -> Self {
        let mut registry = Registry::default();
        let mut m = Self::register(&mut registry);
        m.registry = Some(Mutex::new(registry));
        m
    }

    /// The Prometheus text encoding of the own registry (empty when registered elsewhere).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Some(r) = &self.registry {
            let r = r.lock().unwrap_or_else(|e| e.into_inner());
            if encode(&mut out, &r).is_err() {
                out.clear();
            }
        }
        out
    }

    pub(crate) fn pushed(&self, type_url: &str, latency: Option<std::time::Duration>) {
        let l = labels(type_url);
        self.pushes.get_or_create(&l).inc();
        if let Some(d) = latency {
            self.push_latency.get_or_create(&l).observe(d.as_secs_f64());
        }
    }

    pub(crate) fn nacked(&self, type_url: &str) {
        self.nacks.get_or_create(&labels(type_url)).inc();
    }

    pub(crate) fn nacked_resources(&self, type_url: &str, n: usize) {
        self.nacked_resources
            .get_or_create(&labels(type_url))
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    pub(crate) fn set_resources(&self, type_url: &str, n: usize) {
        self.resources
            .get_or_create(&labels(type_url))
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn connected(&self) -> ConnectedGuard<'_> {
        self.connected.inc();
        ConnectedGuard(&self.connected)
    }

    /// Responses pushed for `type_url` so far.
    pub fn pushes(&self, type_url: &str) -> u64 {
        self.pushes.get_or_create(&labels(type_url)).get()
    }

    /// Resources named in the NACKs received for `type_url` so far.
    pub fn nacked_resource_count(&self, type_url: &str) -> u64 {
        self.nacked_resources.get_or_create(&labels(type_url)).get()
    }

    /// NACKs received for `type_url` so far.
    pub fn nacks(&self, type_url: &str) -> u64 {
        self.nacks.get_or_create(&labels(type_url)).get()
    }

    /// Open streams.
    pub fn connected_clients(&self) -> i64 {
        self.connected.get()
    }
}

/// Decrements the connected-clients gauge when the stream ends.
pub(crate) struct ConnectedGuard<'a>(&'a Gauge);

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_encoding_carries_the_type_label() {
        let m = Metrics::standalone();
        m.pushed("type.googleapis.com/istio.workload.Address", None);
        m.pushed(
            "type.googleapis.com/istio.workload.Address",
            Some(std::time::Duration::from_millis(3)),
        );
        m.nacked("type.googleapis.com/istio.security.Authorization");
        m.set_resources("type.googleapis.com/istio.workload.Address", 12);
        {
            let _g = m.connected();
            assert_eq!(m.connected_clients(), 1);
        }
        assert_eq!(m.connected_clients(), 0);
        let t = m.encode();
        assert!(
            t.contains("xds_pushes_total{type=\"istio.workload.Address\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("xds_nacks_total{type=\"istio.security.Authorization\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("xds_resources{type=\"istio.workload.Address\"} 12"),
            "{t}"
        );
        assert!(
            t.contains("xds_push_latency_seconds_count{type=\"istio.workload.Address\"} 1"),
            "{t}"
        );
        assert!(t.contains("xds_connected_clients 0"), "{t}");
    }
}
