//! The configuration data model shared by ztunnel and the waypoint: workloads, services and L4
//! policies in the camelCase JSON form of Istio ztunnel's local config (`workload.proto`), so a
//! file written for Istio's ztunnel deserialises unchanged. Unknown keys are rejected.

use crate::identity::{Identity, DEFAULT_TRUST_DOMAIN};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

/// How a workload accepts mesh traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// Not in the mesh (or not capable of HBONE): plain TCP.
    #[default]
    Tcp,
    /// Reached through its node's ztunnel on 15008.
    Hbone,
}

/// A waypoint reference: `destination` is `"<network>/<IP>"` (Istio's NetworkAddress form) or a
/// hostname; `hboneMtlsPort` is the waypoint's HBONE port (15006 by default for our waypoint,
/// A map kept as a sorted vector: a workload's few labels and services cost a few dozen bytes
/// instead of a B-tree node each (over half a kilobyte), which matters at tens of thousands of
/// workloads. Same lookups, ordering and serde form as a `BTreeMap`.
pub type SmallMap<K, V> = litemap::LiteMap<K, V>;

/// Labels of a workload.
pub type Labels = SmallMap<String, String>;

/// 15008 for Istio's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    pub destination: String,
    #[serde(default = "default_waypoint_port")]
    pub hbone_mtls_port: u16,
    /// Filled in by the loader from the waypoint workload (not part of the file format).
    #[serde(default, skip_deserializing)]
    pub identity: Option<Identity>,
}

fn default_waypoint_port() -> u16 {
    15006
}

/// Workload health as Istio reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// Locality of a workload (region/zone/subzone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Locality {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub subzone: String,
}

impl Locality {
    /// Istio's written form `region/zone/subzone` (trailing parts may be left out).
    pub fn parse(text: &str) -> Locality {
        let mut parts = text.splitn(3, '/').map(str::to_string);
        Locality {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            subzone: parts.next().unwrap_or_default(),
        }
    }
}

/// A pod (or VM) in the mesh or known to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    #[serde(default)]
    pub uid: String,
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub cluster_id: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub workload_name: String,
    #[serde(default)]
    pub workload_type: String,
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    #[serde(default)]
    pub status: HealthStatus,
    /// Being deleted but still serving (EndpointSlice `serving` and `terminating`): an
    /// endpoint of last resort, for when no healthy endpoint exists (our extension; such a
    /// workload is also `Unhealthy`, as istiod reports it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminating: bool,
    #[serde(default)]
    pub locality: Option<Locality>,
    /// Names (`<ns>/<name>`) of policies bound to this workload (Istio's form).
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    /// Services this workload is an endpoint of: `"<ns>/<hostname>" → {port: targetPort}`.
    #[serde(default, deserialize_with = "port_keys::nested")]
    pub services: SmallMap<String, BTreeMap<u16, u16>>,
    /// Pod labels (our extension; used by policy selectors, Sidecar selectors and subsets).
    #[serde(default)]
    pub labels: Labels,
    /// Pod annotations the node agent reads (our extension, local configuration only: the xDS
    /// Workload has no such field), e.g. `ambient.istio.io/dns-capture: "false"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Relative weight among the endpoints of a service: Istio's Workload `capacity`, a
    /// ServiceEntry endpoint's `weight`. Unset (or 0) counts as 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
}

/// Istio's pod annotation opting a pod out of the DNS proxy.
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";

fn default_namespace() -> String {
    "default".to_string()
}
fn default_service_account() -> String {
    "default".to_string()
}
fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}

impl Workload {
    /// An endpoint outside the mesh (a ServiceEntry's, or an address a DNS-resolved entry
    /// resolved to): plain TCP, on no node, healthy; `workload_type` says where it came from.
    /// No `ip`: a name still to resolve (the caller sets `hostname`).
    pub fn outside_mesh(
        uid: String,
        name: &str,
        namespace: &str,
        ip: Option<IpAddr>,
        workload_type: &str,
    ) -> Workload {
        Workload {
            uid,
            name: name.to_string(),
            namespace: namespace.to_string(),
            service_account: default_service_account(),
            trust_domain: default_trust_domain(),
            workload_ips: ip.into_iter().collect(),
            protocol: Protocol::Tcp,
            node: String::new(),
            network: String::new(),
            cluster_id: String::new(),
            hostname: String::new(),
            workload_name: name.to_string(),
            workload_type: workload_type.to_string(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            waypoint: None,
            status: HealthStatus::Healthy,
            terminating: false,
            locality: None,
            authorization_policies: Vec::new(),
            services: SmallMap::new(),
            labels: SmallMap::new(),
            annotations: BTreeMap::new(),
            capacity: None,
        }
    }

    /// The weight of this workload as an endpoint ([`Workload::capacity`], at least 1).
    pub fn weight(&self) -> u32 {
        self.capacity.unwrap_or(1).max(1)
    }

    /// The SPIFFE identity certificates for this workload carry.
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// Istio's canonical service name (`service.istio.io/canonical-name`, else `app`, else name).
    pub fn canonical_service(&self) -> &str {
        if !self.canonical_name.is_empty() {
            return &self.canonical_name;
        }
        self.labels
            .get("app")
            .map(String::as_str)
            .unwrap_or(&self.name)
    }

    /// Istio's canonical revision, as metrics' `*_version` labels show it
    /// (`service.istio.io/canonical-revision`, else the `version` label).
    pub fn revision(&self) -> Option<&str> {
        if self.canonical_revision.is_empty() {
            self.labels.get("version").map(String::as_str)
        } else {
            Some(&self.canonical_revision)
        }
    }

    /// Whether this pod's DNS queries go to the node agent's DNS proxy: yes unless annotated
    /// `ambient.istio.io/dns-capture: "false"` (as Istio's).
    pub fn dns_capture(&self) -> bool {
        self.annotations
            .get(DNS_CAPTURE_ANNOTATION)
            .is_none_or(|v| !v.trim().eq_ignore_ascii_case("false"))
    }

    /// The owning workload name used in metrics (`workloadName`, else `name`).
    pub fn workload_name(&self) -> &str {
        if self.workload_name.is_empty() {
            &self.name
        } else {
            &self.workload_name
        }
    }
}

/// A Kubernetes Service (or ServiceEntry) as the data plane sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub hostname: String,
    /// Virtual IPs in `"<network>/<IP>"` form (the network part may be empty: `"/10.96.0.10"`).
    #[serde(default)]
    pub vips: Vec<String>,
    /// Service port → target port (0 = same as the service port).
    #[serde(default, deserialize_with = "port_keys::flat")]
    pub ports: BTreeMap<u16, u16>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// Service port → application protocol, as Kubernetes' `appProtocol` or Istio's port-name
    /// convention gives it (`http`, `http2`, `grpc`, `tcp`, `http-web`, …); our extension. Ports
    /// without one are sniffed by the waypoint.
    #[serde(default, deserialize_with = "port_keys::protocols")]
    pub app_protocols: BTreeMap<u16, String>,
    /// Service labels (our extension), e.g. `istio.io/use-waypoint: <gateway>`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    #[serde(default)]
    pub load_balancer: Option<serde_json::Value>,
    #[serde(default)]
    pub ip_families: Option<String>,
    /// Set when this service comes from a `ServiceEntry`: how its traffic is resolved
    /// (`crate::service_entries`). Not part of the file format.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub service_entry: Option<Arc<crate::service_entries::EntryInfo>>,
}

/// How a waypoint treats a service port, from its declared application protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PortProtocol {
    /// HTTP/1.1 (h2c prior knowledge is still recognised).
    Http,
    /// HTTP/2 cleartext: `http2`, `grpc`, `h2c`.
    Http2,
    /// TLS the waypoint does not terminate: `tls`, `https`. Routed at L4 by the ClientHello's
    /// server name (VirtualService `tls` routes), else like TCP.
    Tls,
    /// Opaque TCP: `tcp`, databases…
    Tcp,
    /// Nothing declared: sniff the first bytes.
    Sniff,
}

impl PortProtocol {
    /// Istio's rules: `appProtocol`, or the port name's `<protocol>[-<suffix>]` prefix.
    pub fn parse(value: &str) -> PortProtocol {
        let v = value.to_ascii_lowercase();
        match v.as_str() {
            "grpc-web" => return PortProtocol::Http,
            // Kubernetes' standard appProtocol values.
            "kubernetes.io/h2c" => return PortProtocol::Http2,
            "kubernetes.io/ws" => return PortProtocol::Http,
            "kubernetes.io/wss" => return PortProtocol::Tls,
            _ => {}
        }
        let prefix = v.split('-').next().unwrap_or("");
        match prefix {
            "http" | "http1" | "http11" => PortProtocol::Http,
            "http2" | "grpc" | "h2c" => PortProtocol::Http2,
            "tls" | "https" => PortProtocol::Tls,
            "tcp" | "mongo" | "mysql" | "redis" | "kafka" | "zookeeper" | "amqp" | "mqtt"
            | "nats" | "postgres" => PortProtocol::Tcp,
            _ => PortProtocol::Sniff,
        }
    }
}

impl Service {
    /// How a waypoint treats `port` (see [`PortProtocol`]).
    pub fn port_protocol(&self, port: u16) -> PortProtocol {
        self.app_protocols
            .get(&port)
            .map(|p| PortProtocol::parse(p))
            .unwrap_or(PortProtocol::Sniff)
    }

    /// `<ns>/<hostname>`, the key workloads use in their `services` map.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// Scope of an L4 authorization policy (Istio ztunnel's form).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyScope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// An address match: `{address: "<ip>", length: <prefix>}` as Istio ztunnel writes it, or a
/// plain CIDR/IP string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AddressMatch {
    Cidr(ipnet::IpNet),
    Ip(IpAddr),
    Parts { address: IpAddr, length: u8 },
}

/// String match of a principal or namespace: exact, `prefix*`, `*suffix` or `*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StringMatch {
    Plain(String),
    Typed(TypedStringMatch),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TypedStringMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub presence: Option<serde_json::Value>,
}

/// One match of a clause; its fields AND, each list ORs, `not*` lists exclude.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleMatch {
    #[serde(default)]
    pub namespaces: Vec<StringMatch>,
    #[serde(default)]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(default)]
    pub principals: Vec<StringMatch>,
    #[serde(default)]
    pub not_principals: Vec<StringMatch>,
    #[serde(default)]
    pub source_ips: Vec<AddressMatch>,
    #[serde(default)]
    pub not_source_ips: Vec<AddressMatch>,
    #[serde(default)]
    pub destination_ips: Vec<AddressMatch>,
    #[serde(default)]
    pub not_destination_ips: Vec<AddressMatch>,
    #[serde(default)]
    pub destination_ports: Vec<u16>,
    #[serde(default)]
    pub not_destination_ports: Vec<u16>,
}

/// A clause: a list of matches, any of which satisfies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Clause {
    #[serde(default)]
    pub matches: Vec<RuleMatch>,
}

/// A rule: all clauses must hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub clauses: Vec<Clause>,
}

/// An L4 authorization policy in Istio ztunnel's form (rules OR, clauses AND, matches OR).
/// Istio `AuthorizationPolicy` documents compile to this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: PolicyAction,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// For `WorkloadSelector` scope written as an Istio document: the selector labels.
    /// (Istio ztunnel binds such policies through `Workload.authorizationPolicies` instead;
    /// both forms are honoured.)
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Set when the source Istio policy had L7-only fields (paths, methods…) that an L4 proxy
    /// cannot evaluate: for ALLOW they match nothing, for DENY they match everything (Istio's
    /// fail-closed rule).
    #[serde(default, skip_deserializing)]
    pub has_l7_rules: bool,
}

/// mTLS mode from `PeerAuthentication`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    #[default]
    Permissive,
    Strict,
    Disable,
}

/// A compiled `PeerAuthentication`: root-namespace (mesh-wide), namespace, or selector scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    /// `None` is Istio's `UNSET`: inherit from the next level (namespace, then mesh).
    pub mode: Option<MtlsMode>,
    /// Per-port overrides (`UNSET` ports are simply absent).
    pub port_level: BTreeMap<u16, MtlsMode>,
}

/// Outbound traffic policy from Istio's `Sidecar` resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTrafficMode {
    #[default]
    AllowAny,
    RegistryOnly,
}

/// One egress listener of a `Sidecar`: optional port and `"<ns>/<host>"` host patterns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressListener {
    pub port: Option<u16>,
    pub hosts: Vec<String>,
}

/// A compiled Istio `Sidecar`, as far as the L4 data plane uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarScope {
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub outbound_traffic_policy: OutboundTrafficMode,
    pub egress: Vec<EgressListener>,
}

/// Port maps accept keys written as numbers (`80: 8080`, YAML) or strings (`"80": 8080`, the
/// proto JSON form, where map keys are always strings).
mod port_keys {
    use serde::de::{Deserializer, Error, Visitor};
    use serde::Deserialize;
    use std::collections::BTreeMap;
    use std::fmt;

    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    struct PortKey(u16);

    impl<'de> Deserialize<'de> for PortKey {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = PortKey;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a port number")
                }
                fn visit_u64<E: Error>(self, v: u64) -> Result<PortKey, E> {
                    u16::try_from(v)
                        .map(PortKey)
                        .map_err(|_| E::custom(format!("{v} is not a port number")))
                }
                fn visit_i64<E: Error>(self, v: i64) -> Result<PortKey, E> {
                    u16::try_from(v)
                        .map(PortKey)
                        .map_err(|_| E::custom(format!("{v} is not a port number")))
                }
                fn visit_str<E: Error>(self, v: &str) -> Result<PortKey, E> {
                    v.parse::<u16>()
                        .map(PortKey)
                        .map_err(|_| E::custom(format!("{v:?} is not a port number")))
                }
            }
            d.deserialize_any(V)
        }
    }

    #[derive(Deserialize)]
    struct PortMap<V = u16>(BTreeMap<PortKey, V>);

    impl<V> PortMap<V> {
        fn into_map(self) -> BTreeMap<u16, V> {
            self.0.into_iter().map(|(k, v)| (k.0, v)).collect()
        }
    }

    pub fn protocols<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u16, String>, D::Error> {
        Ok(PortMap::<String>::deserialize(d)?.into_map())
    }

    pub fn flat<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u16, u16>, D::Error> {
        Ok(PortMap::deserialize(d)?.into_map())
    }

    pub fn nested<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<super::SmallMap<String, BTreeMap<u16, u16>>, D::Error> {
        let raw = super::SmallMap::<String, PortMap>::deserialize(d)?;
        Ok(raw.into_iter().map(|(k, v)| (k, v.into_map())).collect())
    }
}

#[cfg(test)]
mod protocol_tests {
    use super::PortProtocol;

    #[test]
    fn protocol_from_app_protocol_or_port_name() {
        assert_eq!(PortProtocol::parse("http"), PortProtocol::Http);
        assert_eq!(PortProtocol::parse("http-80"), PortProtocol::Http);
        assert_eq!(PortProtocol::parse("grpc"), PortProtocol::Http2);
        assert_eq!(PortProtocol::parse("http2-api"), PortProtocol::Http2);
        assert_eq!(PortProtocol::parse("grpc-web"), PortProtocol::Http);
        assert_eq!(PortProtocol::parse("TCP"), PortProtocol::Tcp);
        assert_eq!(PortProtocol::parse("redis"), PortProtocol::Tcp);
        assert_eq!(PortProtocol::parse("tls"), PortProtocol::Tls);
        assert_eq!(PortProtocol::parse("https-api"), PortProtocol::Tls);
        assert_eq!(
            PortProtocol::parse("kubernetes.io/h2c"),
            PortProtocol::Http2
        );
        assert_eq!(PortProtocol::parse("kubernetes.io/ws"), PortProtocol::Http);
        assert_eq!(PortProtocol::parse("web"), PortProtocol::Sniff);
    }
}
