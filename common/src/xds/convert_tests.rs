//! Round trips model → WDS → model, and the rejections Istio's ztunnel also makes.

use super::*;
use crate::config::load_str;
use prost::Message;

const MESH: &str = r#"
workloads:
- uid: Kubernetes//Pod/default/web-0
  name: web-0
  namespace: default
  serviceAccount: web
  workloadIps: [10.244.1.5, "fd00::5"]
  protocol: HBONE
  node: n1
  canonicalName: web
  canonicalRevision: v1
  workloadName: web
  status: Unhealthy
  terminating: true
  locality: {region: r, zone: z, subzone: s}
  authorizationPolicies: [default/sel]
  services: {"default/web.default.svc.cluster.local": {80: 8080}}
  labels: {app: web, version: v1}
- uid: legacy
  name: legacy
  namespace: other
  trustDomain: example.org
  workloadIps: [10.244.2.9]
  annotations: {"ambient.istio.io/dns-capture": "false"}
services:
- name: web
  namespace: default
  hostname: web.default.svc.cluster.local
  vips: ["/10.96.0.5"]
  ports: {80: 8080, 9090: 0}
  appProtocols: {80: http, 9090: grpc}
  subjectAltNames: [spiffe://cluster.local/ns/default/sa/web]
policies:
- name: sel
  namespace: default
  scope: WorkloadSelector
  action: Deny
  rules:
  - clauses:
    - matches:
      - principals: ["cluster.local/ns/default/sa/bad", "*/sa/evil", "spiffe://td/ns/x/*"]
        notNamespaces: [{exact: kube-system}]
        sourceIps: [10.0.0.0/8, 10.1.2.3]
        notDestinationPorts: [22]
"#;

fn snapshot() -> crate::snapshot::Snapshot {
    load_str(MESH, "mesh.yaml").expect("fixture loads")
}

#[test]
fn workloads_round_trip_through_the_wire_form() {
    for w in &snapshot().workloads {
        let wire = workload_to_proto(w).expect("encodes");
        let bytes = wire.encode_to_vec();
        let decoded = wds::Workload::decode(bytes.as_slice()).expect("decodes");
        let back = workload_from_proto(decoded).expect("converts back");
        let mut expected = w.as_ref().clone();
        if expected.workload_type.is_empty() {
            // WDS has no "unset": its default is DEPLOYMENT.
            expected.workload_type = "deployment".into();
        }
        assert_eq!(back, expected);
    }
}

/// `capacity` (an endpoint's weight) travels as Istio's Workload field 27.
#[test]
fn capacity_round_trips_as_istios_field() {
    let mut w = snapshot().workloads[0].as_ref().clone();
    w.capacity = Some(5);
    let wire = workload_to_proto(&w).expect("encodes");
    assert_eq!(wire.capacity, Some(5));
    let back = workload_from_proto(wire).expect("converts back");
    assert_eq!((back.capacity, back.weight()), (Some(5), 5));
    w.capacity = None;
    let back = workload_from_proto(workload_to_proto(&w).expect("encodes")).expect("back");
    assert_eq!((back.capacity, back.weight()), (None, 1));
}

#[test]
fn default_trust_domain_is_elided_like_istiod() {
    let snap = snapshot();
    let web = snap
        .workloads
        .iter()
        .find(|w| w.name == "web-0")
        .expect("web");
    assert_eq!(workload_to_proto(web).expect("encodes").trust_domain, "");
    let legacy = snap
        .workloads
        .iter()
        .find(|w| w.name == "legacy")
        .expect("legacy");
    assert_eq!(
        workload_to_proto(legacy).expect("encodes").trust_domain,
        "example.org"
    );
}

#[test]
fn services_round_trip_with_declared_protocols() {
    for s in &snapshot().services {
        let wire = service_to_proto(s).expect("encodes");
        assert_eq!(wire.ports.len(), 2);
        let back = service_from_proto(wire).expect("converts back");
        assert_eq!(back.vips, s.vips);
        assert_eq!(back.ports, s.ports);
        assert_eq!(
            back.app_protocols.get(&80).map(String::as_str),
            Some("http")
        );
        assert_eq!(
            back.app_protocols.get(&9090).map(String::as_str),
            Some("grpc")
        );
        assert_eq!(back.subject_alt_names, s.subject_alt_names);
    }
}

#[test]
fn policies_keep_their_meaning_on_the_wire() {
    use crate::policy::string_matches;
    let snap = snapshot();
    let p = &snap.authorizations[0];
    let wire = authorization_to_proto(p);
    let back = authorization_from_proto(wire)
        .expect("converts")
        .expect("not dry run");
    assert_eq!(back.scope, p.scope);
    assert_eq!(back.action, p.action);
    let m = &back.rules[0].clauses[0].matches[0];
    // Principals keep their matching behaviour (exact, suffix, prefix without spiffe://).
    let principal = |s: &str| m.principals.iter().any(|pm| string_matches(pm, s));
    assert!(principal("cluster.local/ns/default/sa/bad"));
    assert!(principal("cluster.local/ns/a/sa/evil"));
    assert!(principal("td/ns/x/sa/y"));
    assert!(!principal("cluster.local/ns/default/sa/good"));
    assert_eq!(m.source_ips.len(), 2);
    assert_eq!(m.not_destination_ports, vec![22]);
}

#[test]
fn l7_only_policies_fail_closed_on_the_wire() {
    let mut deny = snapshot().authorizations[0].as_ref().clone();
    deny.has_l7_rules = true;
    let wire = authorization_to_proto(&deny);
    assert_eq!(wire.rules.len(), 1, "DENY matches everything");
    assert!(wire.rules[0].clauses.is_empty());
    deny.action = PolicyAction::Allow;
    assert!(
        authorization_to_proto(&deny).rules.is_empty(),
        "ALLOW matches nothing"
    );
}

#[test]
fn malformed_wire_resources_are_refused_with_the_field() {
    let mut w = wds::Workload {
        uid: "u".into(),
        addresses: vec![vec![1, 2, 3]],
        ..Default::default()
    };
    let e = workload_from_proto(w.clone()).expect_err("3-byte address");
    assert_eq!(e.field, "addresses[0]");
    w.addresses.clear();
    w.services
        .insert("no-slash".into(), wds::PortList::default());
    assert!(workload_from_proto(w.clone()).is_err());
    w.services.clear();
    w.waypoint = Some(wds::GatewayAddress {
        destination: None,
        hbone_mtls_port: 15008,
    });
    assert_eq!(
        workload_from_proto(w).expect_err("no destination").field,
        "waypoint"
    );
    let p = sec::Authorization {
        name: "x".into(),
        scope: 7,
        ..Default::default()
    };
    assert!(authorization_from_proto(p).is_err());
    let p = sec::Authorization {
        name: "x".into(),
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    source_ips: vec![sec::Address {
                        address: vec![10, 0, 0, 1],
                        length: 33,
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    assert!(authorization_from_proto(p).is_err(), "a /33 is refused");
}

#[test]
fn dry_run_policies_are_not_enforced() {
    let p = sec::Authorization {
        name: "x".into(),
        dry_run: true,
        ..Default::default()
    };
    assert_eq!(authorization_from_proto(p), Ok(None));
}

#[test]
fn hostname_waypoints_round_trip() {
    let gw = GatewayAddress {
        destination: "default/waypoint.default.svc.cluster.local".into(),
        hbone_mtls_port: 15008,
        identity: None,
    };
    let wire = gateway_to_proto(&gw).expect("encodes");
    assert!(matches!(
        wire.destination,
        Some(wds::gateway_address::Destination::Hostname(_))
    ));
    assert_eq!(gateway_from_proto(&wire, "waypoint").expect("decodes"), gw);
}
