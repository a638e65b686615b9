//! The Istio `DestinationRule` spec as serde types (subsets by labels, `trafficPolicy` at top
//! level, per subset and per port), its validation, and the compiled [`DestinationPolicy`] whose
//! [`DestinationPolicy::effective`] applies Istio's merge rules for one (subset, port): port-level
//! settings replace the four policies of their level wholesale, subset fields override the
//! top-level ones field by field.

use super::spec::Duration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<SubsetSpec>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubsetSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTlsSettings>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    pub port: super::spec::PortSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTlsSettings>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<SimpleLb>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHashSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_lb_setting: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_duration_secs: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    Unspecified,
    LeastConn,
    Random,
    Passthrough,
    RoundRobin,
    LeastRequest,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHashSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_cookie: Option<HttpCookie>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_source_ip: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_query_parameter_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_hash: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ring_size: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCookie {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_upgrade_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_client_protocol: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_external_local_origin_errors: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_local_origin_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive5xx_errors: Option<u32>,
    /// Deprecated alias of `consecutive5xxErrors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_health_percent: Option<i32>,
}

/// Upstream TLS settings: modelled so DestinationRules load, not used by the HBONE data plane.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTlsSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_crl: Option<String>,
}

/// The load-balancing policy of a destination, as data (pickers live in [`super::select`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum LbPolicy {
    RoundRobin,
    /// Envoy's power-of-two-choices least request (`LEAST_CONN` is its deprecated alias);
    /// Istio's default when no DestinationRule (or `UNSPECIFIED`) says otherwise.
    #[default]
    LeastRequest,
    Random,
    /// Connect to the address the client asked for; no endpoint is picked.
    Passthrough,
    ConsistentHash(HashKey),
}

/// What a consistent-hash policy hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    /// A request header (lower-cased name).
    Header(String),
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

/// Connection-pool limits with Istio/Envoy defaults filled in (`u32::MAX` = unlimited,
/// `max_requests_per_connection` 0 = unlimited).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    pub max_connections: u32,
    pub connect_timeout: Duration,
    pub http1_max_pending_requests: u32,
    pub http2_max_requests: u32,
    pub max_requests_per_connection: u32,
    pub max_retries: u32,
    pub idle_timeout: Duration,
    /// `h2UpgradePolicy: UPGRADE`: HTTP/1.1 requests go upstream as HTTP/2.
    pub h2_upgrade: bool,
    /// `useClientProtocol: true`: the upstream leg always speaks the client's protocol.
    pub use_client_protocol: bool,
}

impl Default for ConnectionPool {
    fn default() -> Self {
        ConnectionPool {
            max_connections: u32::MAX,
            connect_timeout: Duration(std::time::Duration::from_secs(10)),
            http1_max_pending_requests: u32::MAX,
            http2_max_requests: u32::MAX,
            max_requests_per_connection: 0,
            max_retries: u32::MAX,
            idle_timeout: Duration(std::time::Duration::from_secs(3600)),
            h2_upgrade: false,
            use_client_protocol: false,
        }
    }
}

/// Outlier detection with Envoy defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outlier {
    /// 0 disables 5xx-based ejection.
    pub consecutive_5xx_errors: u32,
    /// 0 disables gateway-error-based ejection.
    pub consecutive_gateway_errors: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

/// The policy in force for one destination (host, subset, port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct EffectivePolicy {
    pub load_balancer: LbPolicy,
    pub connection_pool: ConnectionPool,
    pub outlier_detection: Option<Outlier>,
    pub tls: Option<ClientTlsSettings>,
}

/// A validated DestinationRule, keyed by its (resolved) host.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationPolicy {
    pub name: String,
    pub namespace: String,
    /// FQDN (short names resolved in the rule's namespace) or a wildcard (`*.example.com`).
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<SubsetSpec>,
    pub export_to: Vec<String>,
}

impl super::export::Exported for DestinationPolicy {
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn export_to(&self) -> &[String] {
        &self.export_to
    }
}

/// The four policies a level can set.
#[derive(Clone, Default)]
struct Level {
    lb: Option<LoadBalancerSettings>,
    pool: Option<ConnectionPoolSettings>,
    outlier: Option<OutlierDetection>,
    tls: Option<ClientTlsSettings>,
}

impl Level {
    /// This level's fields, replaced wholesale by its `portLevelSettings` entry for `port`.
    fn of(tp: &TrafficPolicy, port: u16) -> Level {
        match tp
            .port_level_settings
            .iter()
            .find(|p| p.port.number == port)
        {
            Some(p) => Level {
                lb: p.load_balancer.clone(),
                pool: p.connection_pool.clone(),
                outlier: p.outlier_detection.clone(),
                tls: p.tls.clone(),
            },
            None => Level {
                lb: tp.load_balancer.clone(),
                pool: tp.connection_pool.clone(),
                outlier: tp.outlier_detection.clone(),
                tls: tp.tls.clone(),
            },
        }
    }
}

impl DestinationPolicy {
    pub fn subset(&self, name: &str) -> Option<&SubsetSpec> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// The policy for `subset` (if any) on `port`, with Istio's precedence and defaults.
    pub fn effective(&self, subset: Option<&str>, port: u16) -> EffectivePolicy {
        let mut level = self
            .traffic_policy
            .as_ref()
            .map(|tp| Level::of(tp, port))
            .unwrap_or_default();
        let subset_tp = subset
            .and_then(|s| self.subset(s))
            .and_then(|s| s.traffic_policy.as_ref());
        if let Some(tp) = subset_tp {
            let sub = Level::of(tp, port);
            let port_override = tp.port_level_settings.iter().any(|p| p.port.number == port);
            if port_override {
                level = sub;
            } else {
                level.lb = sub.lb.or(level.lb);
                level.pool = sub.pool.or(level.pool);
                level.outlier = sub.outlier.or(level.outlier);
                level.tls = sub.tls.or(level.tls);
            }
        }
        EffectivePolicy {
            load_balancer: level.lb.as_ref().map(lb_policy).unwrap_or_default(),
            connection_pool: pool(level.pool.as_ref()),
            outlier_detection: level.outlier.as_ref().map(outlier),
            tls: level.tls,
        }
    }
}

fn lb_policy(lb: &LoadBalancerSettings) -> LbPolicy {
    if let Some(ch) = &lb.consistent_hash {
        let key = if let Some(h) = &ch.http_header_name {
            HashKey::Header(h.to_ascii_lowercase())
        } else if let Some(c) = &ch.http_cookie {
            HashKey::Cookie {
                name: c.name.clone(),
                path: c.path.clone(),
                ttl: c.ttl,
            }
        } else if let Some(q) = &ch.http_query_parameter_name {
            HashKey::QueryParameter(q.clone())
        } else {
            HashKey::SourceIp
        };
        return LbPolicy::ConsistentHash(key);
    }
    match lb.simple {
        Some(SimpleLb::LeastConn | SimpleLb::LeastRequest) => LbPolicy::LeastRequest,
        Some(SimpleLb::Random) => LbPolicy::Random,
        Some(SimpleLb::Passthrough) => LbPolicy::Passthrough,
        Some(SimpleLb::RoundRobin) => LbPolicy::RoundRobin,
        Some(SimpleLb::Unspecified) | None => LbPolicy::LeastRequest,
    }
}

fn pool(p: Option<&ConnectionPoolSettings>) -> ConnectionPool {
    let mut out = ConnectionPool::default();
    let Some(p) = p else { return out };
    if let Some(tcp) = &p.tcp {
        out.max_connections = tcp.max_connections.unwrap_or(out.max_connections);
        out.connect_timeout = tcp.connect_timeout.unwrap_or(out.connect_timeout);
    }
    if let Some(http) = &p.http {
        out.http1_max_pending_requests = http
            .http1_max_pending_requests
            .unwrap_or(out.http1_max_pending_requests);
        out.http2_max_requests = http.http2_max_requests.unwrap_or(out.http2_max_requests);
        out.max_requests_per_connection = http
            .max_requests_per_connection
            .unwrap_or(out.max_requests_per_connection);
        out.max_retries = http.max_retries.unwrap_or(out.max_retries);
        out.idle_timeout = http.idle_timeout.unwrap_or(out.idle_timeout);
        out.h2_upgrade = http
            .h2_upgrade_policy
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case("UPGRADE"));
        out.use_client_protocol = http.use_client_protocol.unwrap_or(false);
    }
    out
}

fn outlier(o: &OutlierDetection) -> Outlier {
    let secs = |s| Duration(std::time::Duration::from_secs(s));
    Outlier {
        consecutive_5xx_errors: o
            .consecutive5xx_errors
            .or(o.consecutive_errors)
            .unwrap_or(5),
        consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
        interval: o.interval.unwrap_or(secs(10)),
        base_ejection_time: o.base_ejection_time.unwrap_or(secs(30)),
        max_ejection_percent: o
            .max_ejection_percent
            .map_or(10, |p| p.clamp(0, 100) as u32),
        min_health_percent: o.min_health_percent.map_or(0, |p| p.clamp(0, 100) as u32),
    }
}

/// Validates a DestinationRule spec; errors are `(field path, message)`.
pub fn validate(spec: &DestinationRuleSpec) -> Result<(), (String, String)> {
    if spec.host.is_empty() {
        return Err((
            "spec.host".into(),
            "missing (the host the rule applies to)".into(),
        ));
    }
    if let Err((i, message)) = super::export::validate(&spec.export_to) {
        return Err((format!("spec.exportTo[{i}]"), message));
    }
    if let Some(tp) = &spec.traffic_policy {
        validate_policy(tp, "spec.trafficPolicy")?;
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            return Err((format!("{path}.name"), "must not be empty".into()));
        }
        if !seen.insert(s.name.as_str()) {
            return Err((
                format!("{path}.name"),
                format!("subset {:?} is defined twice", s.name),
            ));
        }
        if let Some(tp) = &s.traffic_policy {
            validate_policy(tp, &format!("{path}.trafficPolicy"))?;
        }
    }
    Ok(())
}

fn validate_policy(tp: &TrafficPolicy, path: &str) -> Result<(), (String, String)> {
    let check_level =
        |lb: &Option<LoadBalancerSettings>, od: &Option<OutlierDetection>, p: &str| {
            if let Some(lb) = lb {
                validate_lb(lb, &format!("{p}.loadBalancer"))?;
            }
            if let Some(od) = od {
                for (name, v) in [
                    ("maxEjectionPercent", od.max_ejection_percent),
                    ("minHealthPercent", od.min_health_percent),
                ] {
                    if let Some(v) = v.filter(|v| !(0..=100).contains(v)) {
                        return Err((
                            format!("{p}.outlierDetection.{name}"),
                            format!("{v} is not between 0 and 100"),
                        ));
                    }
                }
            }
            Ok(())
        };
    check_level(&tp.load_balancer, &tp.outlier_detection, path)?;
    let mut ports = std::collections::BTreeSet::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let p = format!("{path}.portLevelSettings[{i}]");
        if pl.port.number == 0 {
            return Err((format!("{p}.port.number"), "0 is not a port number".into()));
        }
        if !ports.insert(pl.port.number) {
            return Err((
                format!("{p}.port.number"),
                format!("port {} is listed twice", pl.port.number),
            ));
        }
        check_level(&pl.load_balancer, &pl.outlier_detection, &p)?;
    }
    Ok(())
}

fn validate_lb(lb: &LoadBalancerSettings, path: &str) -> Result<(), (String, String)> {
    match (&lb.simple, &lb.consistent_hash) {
        (Some(_), Some(_)) => Err((
            path.into(),
            "set either simple or consistentHash, not both".into(),
        )),
        (_, Some(ch)) => {
            let keys = [
                ch.http_header_name.is_some(),
                ch.http_cookie.is_some(),
                ch.use_source_ip == Some(true),
                ch.http_query_parameter_name.is_some(),
            ];
            if let Some(c) = &ch.http_cookie {
                let cpath = format!("{path}.consistentHash.httpCookie");
                if c.name.is_empty() || !c.name.bytes().all(is_cookie_name_byte) {
                    return Err((
                        format!("{cpath}.name"),
                        format!("{:?} is not a cookie name (an HTTP token)", c.name),
                    ));
                }
                if let Some(p) = &c.path {
                    if !p.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b';') {
                        return Err((
                            format!("{cpath}.path"),
                            format!("{p:?} is not a cookie path (visible ASCII without ';')"),
                        ));
                    }
                }
            }
            match keys.iter().filter(|k| **k).count() {
                1 => Ok(()),
                0 => Err((format!("{path}.consistentHash"), "set one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".into())),
                _ => Err((format!("{path}.consistentHash"), "set only one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".into())),
            }
        }
        _ => Ok(()),
    }
}

/// A byte of an HTTP token (RFC 9110), which a cookie name must be.
fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Fields of a DestinationRule this data plane accepts (so users' files load unchanged) but
/// does not apply, as `spec.…` paths: the loader reports each as a warning so nobody relies on
/// them silently.
pub fn ignored_fields(spec: &DestinationRuleSpec) -> Vec<String> {
    let mut out = Vec::new();
    if spec.workload_selector.is_some() {
        out.push("spec.workloadSelector".to_string());
    }
    if let Some(tp) = &spec.traffic_policy {
        ignored_in_policy(tp, "spec.trafficPolicy", &mut out);
    }
    for (i, s) in spec.subsets.iter().enumerate() {
        if let Some(tp) = &s.traffic_policy {
            ignored_in_policy(tp, &format!("spec.subsets[{i}].trafficPolicy"), &mut out);
        }
    }
    out
}

fn ignored_in_policy(tp: &TrafficPolicy, path: &str, out: &mut Vec<String>) {
    if tp.tunnel.is_some() {
        out.push(format!("{path}.tunnel"));
    }
    if tp.proxy_protocol.is_some() {
        out.push(format!("{path}.proxyProtocol"));
    }
    ignored_in_level(
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        tp.tls.as_ref(),
        path,
        out,
    );
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        ignored_in_level(
            p.load_balancer.as_ref(),
            p.connection_pool.as_ref(),
            p.outlier_detection.as_ref(),
            p.tls.as_ref(),
            &format!("{path}.portLevelSettings[{i}]"),
            out,
        );
    }
}

fn ignored_in_level(
    lb: Option<&LoadBalancerSettings>,
    pool: Option<&ConnectionPoolSettings>,
    outlier: Option<&OutlierDetection>,
    tls: Option<&ClientTlsSettings>,
    path: &str,
    out: &mut Vec<String>,
) {
    let mut flag = |set: bool, field: &str| {
        if set {
            out.push(format!("{path}.{field}"));
        }
    };
    if let Some(lb) = lb {
        flag(
            lb.locality_lb_setting.is_some(),
            "loadBalancer.localityLbSetting",
        );
        flag(
            lb.warmup_duration_secs.is_some() || lb.warmup.is_some(),
            "loadBalancer.warmup",
        );
        if let Some(ch) = &lb.consistent_hash {
            flag(
                ch.ring_hash.is_some() || ch.maglev.is_some() || ch.minimum_ring_size.is_some(),
                "loadBalancer.consistentHash (ring options)",
            );
            flag(
                ch.http_cookie
                    .as_ref()
                    .is_some_and(|c| !c.attributes.is_empty()),
                "loadBalancer.consistentHash.httpCookie.attributes",
            );
        }
    }
    if let Some(pool) = pool {
        if let Some(tcp) = &pool.tcp {
            flag(
                tcp.tcp_keepalive.is_some(),
                "connectionPool.tcp.tcpKeepalive",
            );
            flag(
                tcp.max_connection_duration.is_some(),
                "connectionPool.tcp.maxConnectionDuration",
            );
            flag(tcp.idle_timeout.is_some(), "connectionPool.tcp.idleTimeout");
        }
        if let Some(http) = &pool.http {
            flag(
                http.max_concurrent_streams.is_some(),
                "connectionPool.http.maxConcurrentStreams",
            );
        }
    }
    if let Some(o) = outlier {
        flag(
            o.split_external_local_origin_errors.is_some()
                || o.consecutive_local_origin_failures.is_some(),
            "outlierDetection (local-origin errors)",
        );
    }
    if let Some(t) = tls {
        // The mesh's own mTLS (HBONE) is always used; TLS origination is not.
        let mesh_mode = matches!(
            t.mode.as_deref(),
            None | Some("ISTIO_MUTUAL") | Some("DISABLE")
        );
        flag(!mesh_mode, "tls (TLS origination)");
    }
}
