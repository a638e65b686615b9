//! Request metrics with Istio's names: `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`
//! (reporter `waypoint`, as Istio's ambient waypoints report).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: String,
    pub response_code: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// L4 connections closed by a configuration change.
    pub revoked: Counter,
    /// Mirror copies not sent because [`crate::pipeline::MAX_MIRRORS`] were in flight.
    pub mirrors_dropped: Counter,
    /// Connections shed by the listener's caps (`common::admission`).
    pub shed: common::admission::ShedCounter,
    pub duration_ms: Histograms,
    pub request_bytes: Histograms,
    pub response_bytes: Histograms,
}

fn duration_buckets() -> Histogram {
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn size_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 10.0, 9,
    ))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration_ms: Histograms = Family::new_with_constructor(duration_buckets);
        let request_bytes: Histograms = Family::new_with_constructor(size_buckets);
        let response_bytes: Histograms = Family::new_with_constructor(size_buckets);
        registry.register("istio_requests", "Requests processed", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            duration_ms.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            response_bytes.clone(),
        );
        let revoked = Counter::default();
        registry.register(
            "waypoint_connections_revoked",
            "L4 connections closed because a configuration change no longer allows them",
            revoked.clone(),
        );
        registry.register_collector(Box::new(common::logging::DroppedLines::new(
            "waypoint_log_lines_dropped",
        )));
        let mirrors_dropped = Counter::default();
        registry.register(
            "waypoint_mirrors_dropped",
            "Mirror copies not sent because the waypoint's mirror capacity was in use",
            mirrors_dropped.clone(),
        );
        let shed = common::admission::ShedCounter::default();
        registry.register(
            "waypoint_connections_shed",
            "Accepted connections closed at once because the listener was over a cap",
            shed.clone(),
        );
        Metrics {
            registry,
            revoked,
            mirrors_dropped,
            shed,
            requests,
            duration_ms,
            request_bytes,
            response_bytes,
        }
    }

    /// The series of one label set, to record into without looking them up again.
    pub fn handles(&self, labels: &RequestLabels) -> RequestHandles {
        RequestHandles {
            requests: self.requests.get_or_create(labels).clone(),
            duration_ms: self.duration_ms.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }
}

/// Handles on the four series of one label set (cheap clones of the registered metrics).
#[derive(Clone)]
pub struct RequestHandles {
    requests: Counter,
    duration_ms: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestHandles {
    pub fn record(&self, duration_ms: f64, req_bytes: u64, resp_bytes: u64) {
        self.requests.inc();
        self.duration_ms.observe(duration_ms);
        self.request_bytes.observe(req_bytes as f64);
        self.response_bytes.observe(resp_bytes as f64);
    }
}
