//! The DNS proxy on 127.0.0.1:15053 (UDP and TCP), where capture sends mesh pods' port-53
//! traffic: names the mesh knows are answered from the snapshot ([`answer`]), everything else
//! goes to the node's resolvers ([`forward`]); [`server`] owns the sockets (transparent, so
//! answers leave from the address the pod asked). This file owns the per-query pipeline and
//! the `ztunnel_dns_*` metrics.

pub mod answer;
pub mod forward;
pub mod server;

use answer::{Decision, Malformed};
use common::config::ConfigStore;
use forward::Forwarder;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Query type (`a`, `aaaa`, `srv`, …, `other`), or `malformed`.
    pub kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `no_upstream`, `overloaded`, `timeout`, `upstream_error`.
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    /// `local` (answered from the mesh), `forwarded`, `failed`, `malformed`.
    pub path: String,
}

type HistogramFamily = Family<PathLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 50 µs … ~3.3 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

/// `ztunnel_dns_*`.
#[derive(Clone)]
pub struct DnsMetrics {
    pub requests: Family<KindLabels, Counter>,
    pub forwarded: Family<KindLabels, Counter>,
    pub failures: Family<ReasonLabels, Counter>,
    pub duration: HistogramFamily,
}

impl DnsMetrics {
    pub fn register(registry: &mut Registry) -> DnsMetrics {
        let m = DnsMetrics {
            requests: Family::default(),
            forwarded: Family::default(),
            failures: Family::default(),
            duration: HistogramFamily::new_with_constructor(duration_histogram),
        };
        registry.register(
            "ztunnel_dns_requests",
            "DNS queries the DNS proxy received, by query type",
            m.requests.clone(),
        );
        registry.register(
            "ztunnel_dns_forwarded",
            "DNS queries sent to the upstream resolvers, by query type",
            m.forwarded.clone(),
        );
        registry.register(
            "ztunnel_dns_failures",
            "Forwarded DNS queries answered SERVFAIL, by reason",
            m.failures.clone(),
        );
        registry.register(
            "ztunnel_dns_request_duration_seconds",
            "Time from receiving a DNS query to having its answer",
            m.duration.clone(),
        );
        m
    }

    fn observe(&self, path: &str, start: Instant) {
        self.duration
            .get_or_create(&PathLabels {
                path: path.to_string(),
            })
            .observe(start.elapsed().as_secs_f64());
    }
}

/// How a query arrived: its answer's size limit differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

pub struct DnsProxy {
    store: Arc<ConfigStore>,
    /// `--dns-cluster-domain`, else the snapshot's trust domain.
    cluster_domain: Option<String>,
    forwarder: Forwarder,
    metrics: DnsMetrics,
}

impl DnsProxy {
    pub fn new(
        store: Arc<ConfigStore>,
        cluster_domain: Option<String>,
        forwarder: Forwarder,
        metrics: DnsMetrics,
    ) -> DnsProxy {
        DnsProxy {
            store,
            cluster_domain,
            forwarder,
            metrics,
        }
    }

    /// The answer to one query from `client` (None: send nothing).
    pub async fn handle(
        &self,
        bytes: &[u8],
        client: IpAddr,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let start = Instant::now();
        let request = match answer::parse_query(bytes) {
            Ok(r) => r,
            Err(m) => {
                self.metrics
                    .requests
                    .get_or_create(&KindLabels {
                        kind: "malformed".into(),
                    })
                    .inc();
                self.metrics.observe("malformed", start);
                return match m {
                    Malformed::FormErr(m) => m.to_vec().ok(),
                    Malformed::Drop => None,
                };
            }
        };
        let kind = KindLabels {
            kind: answer::kind(&request).to_string(),
        };
        self.metrics.requests.get_or_create(&kind).inc();
        let limit = match transport {
            Transport::Udp => answer::udp_limit(&request),
            Transport::Tcp => usize::from(u16::MAX),
        };
        let decision = {
            let snap = self.store.current();
            let domain = self.cluster_domain.as_deref().unwrap_or(&snap.trust_domain);
            let client = snap.workload_by_ip(client).map(|w| w.as_ref());
            answer::decide(&snap, domain, client, &request)
        };
        match decision {
            Decision::Answer(m) => {
                let out = answer::encode(&m, limit);
                self.metrics.observe("local", start);
                out
            }
            Decision::Forward => {
                self.metrics.forwarded.get_or_create(&kind).inc();
                match self.forwarder.forward(bytes, limit).await {
                    Ok(out) => {
                        self.metrics.observe("forwarded", start);
                        Some(out)
                    }
                    Err(e) => {
                        tracing::debug!(%client, error = %e, "DNS query failed upstream");
                        self.metrics
                            .failures
                            .get_or_create(&ReasonLabels {
                                reason: e.reason().into(),
                            })
                            .inc();
                        self.metrics.observe("failed", start);
                        answer::encode(&answer::servfail(&request), limit)
                    }
                }
            }
        }
    }
}
