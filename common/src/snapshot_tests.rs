//! Unit tests of the snapshot's indices and Istio lookups.
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

fn labels<M: FromIterator<(String, String)>>(pairs: &[(&str, &str)]) -> M {
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
