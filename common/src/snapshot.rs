//! The immutable configuration snapshot both proxies read on every connection: the workloads,
//! services and policies of one loaded configuration plus the lookup indices built once when it
//! is assembled (workload by IP, service by VIP or key, endpoints per service port). It also
//! owns the lookups derived from Istio semantics: PeerAuthentication precedence (`mtls_mode`),
//! Sidecar selection (`sidecar_for`) and REGISTRY_ONLY egress checks (`egress_allowed`).
//! The compiled L7 configuration (routes, DestinationRules, ServiceEntries, L7 policies) rides
//! along in `l7`, with the L7 resources the loader rejected in `rejected`.
//! `config` builds snapshots; `config::watch` swaps them atomically.

use crate::model::{
    Authorization, HealthStatus, MtlsMode, OutboundTrafficMode, PeerAuthentication, Service,
    SidecarScope, Workload,
};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

/// The default Istio root namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// One endpoint of a service port: the workload and the port to connect to on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub target_port: u16,
}

/// The destination of an outbound connection, for [`Snapshot::egress_allowed`].
#[derive(Debug, Clone, Copy)]
pub enum EgressTarget<'a> {
    Service(&'a Service),
    Workload(&'a Workload),
    Unknown,
}

#[derive(Debug, Clone, Default)]
struct Index {
    workload_by_ip: HashMap<IpAddr, Arc<Workload>>,
    service_by_vip: HashMap<IpAddr, Arc<Service>>,
    service_by_key: HashMap<String, Arc<Service>>,
    authorization_by_key: HashMap<String, Arc<Authorization>>,
    /// service key → service port → endpoints.
    endpoints: HashMap<String, BTreeMap<u16, Vec<Endpoint>>>,
}

/// A complete, immutable configuration. Mutating the public fields leaves the indices stale:
/// call [`Snapshot::reindex`] afterwards.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Arc<Service>>,
    pub authorizations: Vec<Arc<Authorization>>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub sidecars: Vec<SidecarScope>,
    pub root_namespace: String,
    pub trust_domain: String,
    /// Mesh-wide default, used when no Sidecar applies.
    pub outbound_traffic_policy: OutboundTrafficMode,
    /// Resources kept for `/config_dump` but not consumed by any data plane (Gateways,
    /// Kubernetes Deployments, Services…).
    pub other_resources: Vec<serde_json::Value>,
    /// The compiled VirtualServices, DestinationRules, ServiceEntries and L7 policies.
    pub l7: Arc<crate::l7::L7Config>,
    /// Resources rejected alone, with the reason; the rest of their file applied. A rejected
    /// security resource is replaced by a fail-closed stand-in (`config::reject`).
    pub rejected: Vec<crate::config::ConfigError>,
    #[serde(skip)]
    index: Index,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            workloads: Vec::new(),
            services: Vec::new(),
            authorizations: Vec::new(),
            peer_authentications: Vec::new(),
            sidecars: Vec::new(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
            trust_domain: crate::identity::DEFAULT_TRUST_DOMAIN.to_string(),
            outbound_traffic_policy: OutboundTrafficMode::AllowAny,
            other_resources: Vec::new(),
            l7: Arc::default(),
            rejected: Vec::new(),
            index: Index::default(),
        }
    }
}

/// Parses Istio's `"<network>/<IP>"` address form (the network may be empty) or a plain IP.
pub fn parse_network_address(s: &str) -> Result<(&str, IpAddr), String> {
    let (network, ip) = match s.parse::<IpAddr>() {
        Ok(ip) => return Ok(("", ip)),
        Err(_) => s.split_once('/').unwrap_or(("", s)),
    };
    ip.parse::<IpAddr>()
        .map(|ip| (network, ip.to_canonical()))
        .map_err(|_| format!("{s:?} is not \"<network>/<IP>\" or an IP address"))
}

/// Whether every selector label is present with the same value in `labels`.
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Snapshot {
    /// (Re)builds the lookup indices from the public fields. Duplicates (rejected by the
    /// loader) resolve to the first occurrence.
    pub fn reindex(&mut self) {
        let mut index = Index::default();
        for w in &self.workloads {
            for ip in &w.workload_ips {
                index
                    .workload_by_ip
                    .entry(ip.to_canonical())
                    .or_insert_with(|| w.clone());
            }
        }
        for s in &self.services {
            index
                .service_by_key
                .entry(s.key())
                .or_insert_with(|| s.clone());
            for vip in &s.vips {
                if let Ok((_, ip)) = parse_network_address(vip) {
                    index.service_by_vip.entry(ip).or_insert_with(|| s.clone());
                }
            }
        }
        for a in &self.authorizations {
            let key = format!("{}/{}", a.namespace, a.name);
            index
                .authorization_by_key
                .entry(key)
                .or_insert_with(|| a.clone());
        }
        for (key, svc) in &index.service_by_key {
            let mut per_port = BTreeMap::new();
            for (&port, &svc_target) in &svc.ports {
                let eps: Vec<Endpoint> = self
                    .workloads
                    .iter()
                    .filter(|w| w.status == HealthStatus::Healthy)
                    .filter_map(|w| {
                        let ports = w.services.get(key)?;
                        let target_port = match ports.get(&port) {
                            Some(&p) if p != 0 => p,
                            _ if svc_target != 0 => svc_target,
                            _ => port,
                        };
                        Some(Endpoint {
                            workload: w.clone(),
                            target_port,
                        })
                    })
                    .collect();
                per_port.insert(port, eps);
            }
            index.endpoints.insert(key.clone(), per_port);
        }
        self.index = index;
    }

    /// Builder-style [`Snapshot::reindex`].
    pub fn indexed(mut self) -> Self {
        self.reindex();
        self
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.index.workload_by_ip.get(&ip.to_canonical())
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.index.service_by_vip.get(&ip.to_canonical())
    }

    /// Addresses named as some service's or workload's waypoint (a waypoint pod's IP, or the
    /// VIP of a waypoint's Service), with the identity they resolved to, if any.
    pub fn waypoint_addresses(&self) -> HashMap<IpAddr, Option<&crate::identity::Identity>> {
        self.services
            .iter()
            .filter_map(|s| s.waypoint.as_ref())
            .chain(self.workloads.iter().filter_map(|w| w.waypoint.as_ref()))
            .filter_map(|g| {
                parse_network_address(&g.destination)
                    .ok()
                    .map(|(_, ip)| (ip.to_canonical(), g.identity.as_ref()))
            })
            .collect()
    }

    /// Whether `w` is a waypoint in `addresses` ([`Snapshot::waypoint_addresses`]): one of its
    /// IPs is named as a waypoint, or it is an endpoint of a Service whose VIP is (a scaled
    /// waypoint). Such pods speak HBONE themselves: never captured, and their `forwarded`
    /// header is trusted when their identity is the waypoint's.
    pub fn is_waypoint(
        &self,
        w: &Workload,
        addresses: &HashMap<IpAddr, Option<&crate::identity::Identity>>,
    ) -> bool {
        let id = w.identity();
        let matches = |ip: &IpAddr| {
            addresses
                .get(&ip.to_canonical())
                .is_some_and(|named| named.is_none_or(|n| *n == id))
        };
        w.workload_ips.iter().any(matches)
            || w.services.keys().any(|key| {
                self.service_by_key(key).is_some_and(|s| {
                    s.vips
                        .iter()
                        .filter_map(|v| parse_network_address(v).ok())
                        .any(|(_, ip)| matches(&ip))
                })
            })
    }

    /// `key` is `<namespace>/<hostname>`.
    pub fn service_by_key(&self, key: &str) -> Option<&Arc<Service>> {
        self.index.service_by_key.get(key)
    }

    /// `key` is `<namespace>/<name>`.
    pub fn authorization_by_key(&self, key: &str) -> Option<&Arc<Authorization>> {
        self.index.authorization_by_key.get(key)
    }

    /// Healthy endpoints of `svc` on service port `port`, in configuration order. A port the
    /// service does not declare has none.
    pub fn endpoints(&self, svc: &Service, port: u16) -> &[Endpoint] {
        self.index
            .endpoints
            .get(&svc.key())
            .and_then(|ports| ports.get(&port))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Workloads scheduled on `node`.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workloads.iter().filter(move |w| w.node == node)
    }

    /// The effective PeerAuthentication mode for `w` on `port`, with Istio's precedence:
    /// workload-selector policy (port-level first) > namespace policy > mesh policy (root
    /// namespace) > PERMISSIVE. `UNSET` inherits from the next level.
    pub fn mtls_mode(&self, w: &Workload, port: u16) -> MtlsMode {
        let workload_level = self.peer_authentications.iter().find(|pa| {
            pa.namespace == w.namespace
                && !pa.selector.is_empty()
                && selector_matches(&pa.selector, &w.labels)
        });
        if let Some(pa) = workload_level {
            if let Some(mode) = pa.port_level.get(&port).copied().or(pa.mode) {
                return mode;
            }
        }
        let level = |ns: &str| {
            self.peer_authentications
                .iter()
                .find(|pa| pa.namespace == ns && pa.selector.is_empty())
                .and_then(|pa| pa.mode)
        };
        level(&w.namespace)
            .or_else(|| level(&self.root_namespace))
            .unwrap_or(MtlsMode::Permissive)
    }

    /// The Sidecar that applies to `w`: a selector-matching one in its namespace, else its
    /// namespace's selector-less one, else the root namespace's selector-less one.
    pub fn sidecar_for(&self, w: &Workload) -> Option<&SidecarScope> {
        let in_ns = |ns: &str| {
            self.sidecars
                .iter()
                .find(|s| s.namespace == ns && s.selector.is_empty())
        };
        self.sidecars
            .iter()
            .find(|s| {
                s.namespace == w.namespace
                    && !s.selector.is_empty()
                    && selector_matches(&s.selector, &w.labels)
            })
            .or_else(|| in_ns(&w.namespace))
            .or_else(|| in_ns(&self.root_namespace))
    }

    /// Whether `src` may open an outbound connection to `dst` on `port` under its
    /// outboundTrafficPolicy (the applicable Sidecar's, else the mesh default).
    pub fn egress_allowed(&self, src: &Workload, dst: EgressTarget<'_>, port: u16) -> bool {
        let sidecar = self.sidecar_for(src);
        let mode = sidecar.map_or(self.outbound_traffic_policy, |s| s.outbound_traffic_policy);
        if mode == OutboundTrafficMode::AllowAny {
            return true;
        }
        let (ns, host) = match dst {
            EgressTarget::Unknown => return false,
            EgressTarget::Service(s) => (s.namespace.as_str(), s.hostname.as_str()),
            EgressTarget::Workload(w) => (w.namespace.as_str(), w.name.as_str()),
        };
        let Some(sidecar) = sidecar else { return true };
        if sidecar.egress.is_empty() {
            return true;
        }
        sidecar.egress.iter().any(|l| {
            l.port.is_none_or(|p| p == port)
                && l.hosts
                    .iter()
                    .any(|h| host_pattern_matches(h, &sidecar.namespace, ns, host))
        })
    }
}

/// Matches a Sidecar egress host pattern `<ns>/<host>` against a destination. Namespace part:
/// `*` any, `.` the Sidecar's own namespace, `~` none, else exact. Host part: `*` any,
/// `*.suffix`, else exact (ASCII case-insensitive).
pub fn host_pattern_matches(pattern: &str, sidecar_ns: &str, ns: &str, host: &str) -> bool {
    let Some((pns, phost)) = pattern.split_once('/') else {
        return false;
    };
    let ns_ok = match pns {
        "*" => true,
        "~" => false,
        "." => ns == sidecar_ns,
        other => ns == other,
    };
    if !ns_ok {
        return false;
    }
    if phost == "*" {
        return true;
    }
    match phost.strip_prefix('*') {
        Some(suffix) => {
            host.len() > suffix.len()
                && host
                    .get(host.len() - suffix.len()..)
                    .is_some_and(|t| t.eq_ignore_ascii_case(suffix))
        }
        None => phost.eq_ignore_ascii_case(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EgressListener;

    fn wl(name: &str, ns: &str, ip: &str) -> Workload {
        serde_yaml_ng::from_str(&format!(
            "{{name: {name}, namespace: {ns}, workloadIps: [{ip}], node: n1}}"
        ))
        .expect("valid workload")
    }

    fn svc(yaml: &str) -> Service {
        serde_yaml_ng::from_str(yaml).expect("valid service")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sample() -> Snapshot {
        let mut a = wl("a", "default", "10.0.0.1");
        a.services.insert(
            "default/web.default.svc.cluster.local".into(),
            [(80, 8080)].into(),
        );
        let mut b = wl("b", "default", "10.0.0.2");
        b.services.insert(
            "default/web.default.svc.cluster.local".into(),
            [(80, 0)].into(),
        );
        b.node = "n2".into();
        let mut c = wl("c", "default", "10.0.0.3");
        c.services.insert(
            "default/web.default.svc.cluster.local".into(),
            Default::default(),
        );
        c.status = HealthStatus::Unhealthy;
        let mut d = wl("d", "other", "fd00::4");
        d.services.insert(
            "default/web.default.svc.cluster.local".into(),
            Default::default(),
        );
        let web = svc("{name: web, hostname: web.default.svc.cluster.local, vips: [\"/10.96.0.10\"], ports: {80: 9090, 443: 0}}");
        Snapshot {
            workloads: vec![Arc::new(a), Arc::new(b), Arc::new(c), Arc::new(d)],
            services: vec![Arc::new(web)],
            ..Default::default()
        }
        .indexed()
    }

    #[test]
    fn lookups_by_ip_vip_key() {
        let s = sample();
        assert_eq!(
            s.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap().name,
            "b"
        );
        assert_eq!(
            s.workload_by_ip("::ffff:10.0.0.1".parse().unwrap())
                .unwrap()
                .name,
            "a"
        );
        assert_eq!(
            s.workload_by_ip("fd00::4".parse().unwrap()).unwrap().name,
            "d"
        );
        assert!(s.workload_by_ip("10.0.0.9".parse().unwrap()).is_none());
        assert_eq!(
            s.service_by_vip("10.96.0.10".parse().unwrap())
                .unwrap()
                .name,
            "web"
        );
        assert!(s
            .service_by_key("default/web.default.svc.cluster.local")
            .is_some());
        assert!(s.service_by_key("default/nope").is_none());
        assert_eq!(
            s.local_workloads("n1")
                .map(|w| w.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "c", "d"]
        );
    }

    #[test]
    fn endpoints_and_target_ports() {
        let s = sample();
        let web = s.services[0].clone();
        let eps: Vec<(&str, u16)> = s
            .endpoints(&web, 80)
            .iter()
            .map(|e| (e.workload.name.as_str(), e.target_port))
            .collect();
        // a: own entry 8080; b: own entry 0 → service's 9090; c unhealthy; d: no entry → 9090.
        assert_eq!(eps, [("a", 8080), ("b", 9090), ("d", 9090)]);
        let eps443: Vec<u16> = s
            .endpoints(&web, 443)
            .iter()
            .map(|e| e.target_port)
            .collect();
        assert_eq!(eps443, [443, 443, 443]);
        assert!(s.endpoints(&web, 8081).is_empty());
        let unknown = svc("{name: x, hostname: x, ports: {80: 80}}");
        assert!(s.endpoints(&unknown, 80).is_empty());
    }

    #[test]
    fn network_address_forms() {
        assert_eq!(
            parse_network_address("/10.0.0.1").unwrap(),
            ("", "10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_network_address("net1/fd00::1").unwrap(),
            ("net1", "fd00::1".parse().unwrap())
        );
        assert_eq!(
            parse_network_address("10.0.0.1").unwrap().1,
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert!(parse_network_address("10.0.0.1/32").is_err());
        assert!(parse_network_address("example.com").is_err());
        assert!(parse_network_address("").is_err());
    }

    fn pa(
        name: &str,
        ns: &str,
        sel: &[(&str, &str)],
        mode: Option<MtlsMode>,
        ports: &[(u16, MtlsMode)],
    ) -> PeerAuthentication {
        PeerAuthentication {
            name: name.into(),
            namespace: ns.into(),
            selector: labels(sel),
            mode,
            port_level: ports.iter().copied().collect(),
        }
    }

    #[test]
    fn mtls_precedence() {
        use MtlsMode::*;
        let mut w = wl("a", "default", "10.0.0.1");
        w.labels = labels(&[("app", "web")]);
        let other = wl("o", "other", "10.0.0.2");
        let mut s = Snapshot::default();
        assert_eq!(s.mtls_mode(&w, 80), Permissive);
        s.peer_authentications
            .push(pa("mesh", "istio-system", &[], Some(Strict), &[]));
        assert_eq!(s.mtls_mode(&w, 80), Strict);
        assert_eq!(s.mtls_mode(&other, 80), Strict);
        s.peer_authentications
            .push(pa("ns", "default", &[], Some(Disable), &[]));
        assert_eq!(s.mtls_mode(&w, 80), Disable);
        assert_eq!(s.mtls_mode(&other, 80), Strict);
        s.peer_authentications.push(pa(
            "wl",
            "default",
            &[("app", "web")],
            None,
            &[(9000, Permissive)],
        ));
        assert_eq!(
            s.mtls_mode(&w, 80),
            Disable,
            "UNSET inherits from the namespace"
        );
        assert_eq!(s.mtls_mode(&w, 9000), Permissive);
        s.peer_authentications[1].mode = None;
        assert_eq!(
            s.mtls_mode(&w, 80),
            Strict,
            "UNSET namespace inherits from the mesh"
        );
        s.peer_authentications.insert(
            0,
            pa("wl2", "default", &[("app", "web")], Some(Strict), &[]),
        );
        assert_eq!(
            s.mtls_mode(&w, 9000),
            Strict,
            "first matching selector policy wins"
        );
        s.peer_authentications.insert(
            0,
            pa("nomatch", "default", &[("app", "db")], Some(Disable), &[]),
        );
        assert_eq!(s.mtls_mode(&w, 80), Strict);
    }

    fn sidecar(
        name: &str,
        ns: &str,
        sel: &[(&str, &str)],
        mode: OutboundTrafficMode,
        egress: Vec<EgressListener>,
    ) -> SidecarScope {
        SidecarScope {
            name: name.into(),
            namespace: ns.into(),
            selector: labels(sel),
            outbound_traffic_policy: mode,
            egress,
        }
    }

    #[test]
    fn sidecar_selection() {
        use OutboundTrafficMode::*;
        let mut w = wl("a", "default", "10.0.0.1");
        w.labels = labels(&[("run", "client")]);
        let plain = wl("b", "default", "10.0.0.2");
        let other = wl("c", "other", "10.0.0.3");
        let mut s = Snapshot::default();
        assert!(s.sidecar_for(&w).is_none());
        s.sidecars
            .push(sidecar("root", "istio-system", &[], AllowAny, vec![]));
        assert_eq!(s.sidecar_for(&other).unwrap().name, "root");
        s.sidecars
            .push(sidecar("ns", "default", &[], AllowAny, vec![]));
        s.sidecars.push(sidecar(
            "sel",
            "default",
            &[("run", "client")],
            RegistryOnly,
            vec![],
        ));
        assert_eq!(s.sidecar_for(&w).unwrap().name, "sel");
        assert_eq!(s.sidecar_for(&plain).unwrap().name, "ns");
        assert_eq!(s.sidecar_for(&other).unwrap().name, "root");
    }

    #[test]
    fn egress_registry_only() {
        use OutboundTrafficMode::*;
        let mut src = wl("client", "default", "10.0.0.1");
        src.labels = labels(&[("run", "client")]);
        let web = svc("{name: web, hostname: web.default.svc.cluster.local, ports: {8080: 0}}");
        let ext = svc("{name: db, namespace: ext, hostname: db.example.com}");
        let peer = wl("peer", "default", "10.0.0.2");
        let mut s = Snapshot::default();
        assert!(
            s.egress_allowed(&src, EgressTarget::Unknown, 80),
            "mesh default ALLOW_ANY"
        );
        s.outbound_traffic_policy = RegistryOnly;
        assert!(!s.egress_allowed(&src, EgressTarget::Unknown, 80));
        assert!(
            s.egress_allowed(&src, EgressTarget::Service(&web), 8080),
            "no sidecar: registry allowed"
        );
        let listener = |port, hosts: &[&str]| EgressListener {
            port,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        };
        s.sidecars.push(sidecar(
            "client",
            "default",
            &[("run", "client")],
            RegistryOnly,
            vec![listener(Some(8080), &["./*"])],
        ));
        assert!(s.egress_allowed(&src, EgressTarget::Service(&web), 8080));
        assert!(
            !s.egress_allowed(&src, EgressTarget::Service(&web), 9090),
            "port not listed"
        );
        assert!(
            !s.egress_allowed(&src, EgressTarget::Service(&ext), 8080),
            "other namespace"
        );
        assert!(s.egress_allowed(&src, EgressTarget::Workload(&peer), 8080));
        s.sidecars[0]
            .egress
            .push(listener(None, &["ext/*.example.com"]));
        assert!(s.egress_allowed(&src, EgressTarget::Service(&ext), 5432));
        s.sidecars[0].outbound_traffic_policy = AllowAny;
        assert!(s.egress_allowed(&src, EgressTarget::Unknown, 1));
    }

    #[test]
    fn host_patterns() {
        assert!(host_pattern_matches("*/*", "a", "b", "x"));
        assert!(host_pattern_matches("./*", "a", "a", "x"));
        assert!(!host_pattern_matches("./*", "a", "b", "x"));
        assert!(host_pattern_matches("b/*", "a", "b", "x"));
        assert!(host_pattern_matches("*/x.b.svc", "a", "b", "X.B.svc"));
        assert!(host_pattern_matches("*/*.svc", "a", "b", "x.b.svc"));
        assert!(!host_pattern_matches("*/*.svc", "a", "b", ".svc"));
        assert!(!host_pattern_matches("*/*.svc", "a", "b", "x.b.svcx"));
        assert!(!host_pattern_matches("~/*", "a", "b", "x"));
        assert!(!host_pattern_matches("nohost", "a", "b", "x"));
    }

    #[test]
    fn serializes_without_indices() {
        let s = sample();
        let json = serde_json::to_value(&s).expect("serializable");
        assert!(json.get("index").is_none());
        assert_eq!(json["rootNamespace"], "istio-system");
        assert_eq!(json["workloads"].as_array().map(Vec::len), Some(4));
    }
}
