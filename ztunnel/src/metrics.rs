//! Prometheus metrics with Istio's names and labels (`istio_tcp_*`), served on 15020.
//! Following Istio, `received_bytes` counts client→server bytes and `sent_bytes` server→client.

use common::identity::Identity;
use common::model::{Service, Workload};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    none,
}

/// The label set of Istio's TCP metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: SecurityPolicy,
}

const UNKNOWN: &str = "unknown";

impl TcpLabels {
    pub fn new(
        reporter: Reporter,
        src: Option<&Workload>,
        src_identity: Option<&Identity>,
        dst: Option<&Workload>,
        service: Option<&Service>,
        security: SecurityPolicy,
    ) -> Self {
        let s = |v: Option<&str>| v.unwrap_or(UNKNOWN).to_string();
        let version = |w: Option<&Workload>| s(w.and_then(Workload::revision));
        TcpLabels {
            reporter,
            source_workload: s(src.map(|w| w.workload_name())),
            source_workload_namespace: s(src.map(|w| w.namespace.as_str())),
            source_principal: src_identity
                .map(ToString::to_string)
                .or_else(|| src.map(|w| w.identity().to_string()))
                .unwrap_or_else(|| UNKNOWN.to_string()),
            source_app: s(src.map(|w| w.canonical_service())),
            source_version: version(src),
            destination_service: s(service.map(|x| x.hostname.as_str())),
            destination_service_namespace: s(service.map(|x| x.namespace.as_str())),
            destination_service_name: s(service.map(|x| x.name.as_str())),
            destination_workload: s(dst.map(|w| w.workload_name())),
            destination_workload_namespace: s(dst.map(|w| w.namespace.as_str())),
            destination_principal: dst
                .map(|w| w.identity().to_string())
                .unwrap_or_else(|| UNKNOWN.to_string()),
            destination_app: s(dst.map(|w| w.canonical_service())),
            destination_version: version(dst),
            request_protocol: "tcp".to_string(),
            response_flags: "-".to_string(),
            connection_security_policy: security,
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub sent_bytes: Family<TcpLabels, Counter>,
    pub received_bytes: Family<TcpLabels, Counter>,
    pub active: Gauge,
    pub refused: Counter,
    pub revoked: Counter,
    pub shed: common::admission::ShedCounter,
    pub dns: crate::dns_proxy::DnsMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let opened = Family::<TcpLabels, Counter>::default();
        let closed = Family::<TcpLabels, Counter>::default();
        let sent_bytes = Family::<TcpLabels, Counter>::default();
        let received_bytes = Family::<TcpLabels, Counter>::default();
        let active = Gauge::default();
        let refused = Counter::default();
        let revoked = Counter::default();
        registry.register(
            "istio_tcp_connections_opened",
            "Total TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "Total TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent from server to client on TCP connections",
            sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from client by server on TCP connections",
            received_bytes.clone(),
        );
        registry.register(
            "ztunnel_active_connections",
            "Connections being proxied right now",
            active.clone(),
        );
        registry.register(
            "ztunnel_connections_refused",
            "Captured connections refused (policy, REGISTRY_ONLY, no endpoint, bad peer)",
            refused.clone(),
        );
        registry.register(
            "ztunnel_connections_revoked",
            "Live connections closed because a configuration change no longer allows them",
            revoked.clone(),
        );
        registry.register_collector(Box::new(common::logging::DroppedLines::new(
            "ztunnel_log_lines_dropped",
        )));
        let shed = common::admission::ShedCounter::default();
        registry.register(
            "ztunnel_connections_shed",
            "Accepted connections closed at once because a listener was over a cap",
            shed.clone(),
        );
        let dns = crate::dns_proxy::DnsMetrics::register(&mut registry);
        Metrics {
            dns,
            shed,
            registry,
            opened,
            closed,
            sent_bytes,
            received_bytes,
            active,
            refused,
            revoked,
        }
    }

    /// Records a connection's open; the returned recorder records its close.
    pub fn open(&self, labels: TcpLabels) -> ConnRecorder<'_> {
        self.opened.get_or_create(&labels).inc();
        self.active.inc();
        ConnRecorder {
            metrics: self,
            labels,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub struct ConnRecorder<'a> {
    metrics: &'a Metrics,
    labels: TcpLabels,
}

impl ConnRecorder<'_> {
    /// `received` = client→server bytes, `sent` = server→client bytes.
    pub fn close(self, received: u64, sent: u64) {
        let m = self.metrics;
        m.closed.get_or_create(&self.labels).inc();
        m.received_bytes
            .get_or_create(&self.labels)
            .inc_by(received);
        m.sent_bytes.get_or_create(&self.labels).inc_by(sent);
        m.active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_istio_names_with_labels() {
        let m = Metrics::new();
        let l = TcpLabels::new(
            Reporter::source,
            None,
            None,
            None,
            None,
            SecurityPolicy::mutual_tls,
        );
        m.open(l).close(10, 20);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry).unwrap();
        for name in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
            "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total",
        ] {
            assert!(text.contains(name), "{name} missing in {text}");
        }
        assert!(text.contains("connection_security_policy=\"mutual_tls\""));
        assert!(text.contains("reporter=\"source\""));
    }
}
