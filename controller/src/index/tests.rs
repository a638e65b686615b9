//! The fixture table (`shared/k8s-fixtures/README.md`): every row asserted on the index fed
//! with `demoapp-cluster.yaml`, plus waypoint binding and policy compilation.

use super::*;
use common::model::{HealthStatus, PolicyAction, PolicyScope, Protocol};
use common::snapshot::Snapshot;
use std::net::IpAddr;

pub(crate) const DEMOAPP: &str = "default/demoapp.default.svc.cluster.local";
pub(crate) const DEMOAPP_WEB: &str = "default/demoapp-web.default.svc.cluster.local";
pub(crate) const EXTERNAL_DB: &str = "default/external-db.default.svc.cluster.local";

/// The fixture's objects (the `Endpoints` object is skipped: its mirrored slice is watched).
pub(crate) fn fixture_objects() -> Vec<Object> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/k8s-fixtures/demoapp-cluster.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (shared/ must sit beside the checkout)",
            path.display()
        )
    });
    let list: serde_json::Value = serde_yaml_ng::from_str(&text).expect("fixture is YAML");
    let items = list["items"].as_array().expect("a List").clone();
    items
        .into_iter()
        .filter(|i| i["kind"] != "Endpoints")
        .map(|i| Object::from_json(i).expect("fixture object"))
        .collect()
}

/// One fixture object by kind and name, as JSON (to change it in a test).
pub(crate) fn fixture_json(kind: &str, name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/k8s-fixtures/demoapp-cluster.yaml");
    let text = std::fs::read_to_string(path).expect("fixture");
    let list: serde_json::Value = serde_yaml_ng::from_str(&text).expect("fixture is YAML");
    list["items"]
        .as_array()
        .expect("a List")
        .iter()
        .find(|i| i["kind"] == kind && i["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the fixture"))
        .clone()
}

pub(crate) fn fixture_index() -> Index {
    let mut index = Index::default();
    for o in fixture_objects() {
        index.apply(o);
    }
    index
}

pub(crate) fn obj(v: serde_json::Value) -> Object {
    Object::from_json(v).expect("valid object")
}

pub(crate) fn pod_wl(index: &Index, name: &str) -> Option<Arc<Workload>> {
    index
        .workloads()
        .get(&format!("Kubernetes//Pod/default/{name}"))
        .cloned()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// A data-plane snapshot of the index's outputs (what the proxies would build).
pub(crate) fn snapshot(index: &Index) -> Snapshot {
    let mut snap = Snapshot::default();
    snap.workloads = index.workloads().values().cloned().collect();
    snap.services = index.services().values().cloned().collect();
    snap.authorizations = index.authorizations().values().cloned().collect();
    snap.indexed()
}

#[test]
fn demoapp_pods_are_hbone_workloads_with_pod_metadata() {
    let index = fixture_index();
    let cases = [
        (
            "demoappv10-7c9d8f6b5-4kq2x",
            "node-1",
            vec!["10.244.1.10"],
            "v1.0",
            "demoappv10",
        ),
        (
            "demoappv10-7c9d8f6b5-9zt7m",
            "node-1",
            vec!["10.244.1.11"],
            "v1.0",
            "demoappv10",
        ),
        (
            "demoappv10-7c9d8f6b5-b8wqd",
            "node-2",
            vec!["10.244.2.10", "fd00:10:244:2::a"],
            "v1.0",
            "demoappv10",
        ),
        (
            "demoappv11-5b6f7d9c4-p2lrn",
            "node-2",
            vec!["10.244.2.11"],
            "v1.1",
            "demoappv11",
        ),
    ];
    for (name, node, addrs, version, deployment) in cases {
        let w = pod_wl(&index, name).unwrap_or_else(|| panic!("{name} is a workload"));
        assert_eq!(w.uid, format!("Kubernetes//Pod/default/{name}"));
        assert_eq!(w.name, name);
        assert_eq!(w.namespace, "default");
        assert_eq!(w.protocol, Protocol::Hbone, "{name}");
        assert_eq!(w.node, node);
        assert_eq!(w.service_account, "default");
        assert_eq!(w.trust_domain, "cluster.local");
        assert_eq!(w.workload_ips, ips(&addrs), "{name}");
        assert_eq!(w.canonical_name, "demoapp");
        assert_eq!(w.canonical_revision, version);
        assert_eq!(w.workload_name, deployment);
        assert_eq!(w.labels.get("app").map(String::as_str), Some("demoapp"));
        assert_eq!(w.status, HealthStatus::Healthy);
        assert!(!w.terminating);
        assert!(w.waypoint.is_none());
        let zone = if node == "node-1" { "zone-a" } else { "zone-b" };
        assert_eq!(w.locality.as_ref().map(|l| l.zone.as_str()), Some(zone));
        assert_eq!(
            w.services[&DEMOAPP.to_string()],
            BTreeMap::from([(8080, 8080)]),
            "{name}"
        );
    }
}

#[test]
fn terminating_pod_stays_a_workload_and_is_an_endpoint_of_last_resort() {
    let index = fixture_index();
    let w = pod_wl(&index, "demoappv11-5b6f7d9c4-x7vhc").expect("still a workload");
    assert_eq!(w.status, HealthStatus::Unhealthy);
    assert!(
        w.terminating,
        "serving but terminating in its EndpointSlice"
    );
    assert_eq!(w.protocol, Protocol::Hbone);
    assert_eq!(
        w.services[&DEMOAPP.to_string()],
        BTreeMap::from([(8080, 8080)])
    );
    // The data plane only picks healthy endpoints while any exists.
    let snap = snapshot(&index);
    let svc = snap.service_by_key(DEMOAPP).expect("service").clone();
    let picked: Vec<&str> = snap
        .endpoints(&svc, 8080)
        .iter()
        .map(|e| e.workload.name.as_str())
        .collect();
    assert_eq!(picked.len(), 4, "{picked:?}");
    assert!(!picked.contains(&"demoappv11-5b6f7d9c4-x7vhc"));
}

#[test]
fn redirection_disabled_pod_is_a_plain_tcp_workload() {
    let index = fixture_index();
    let w = pod_wl(&index, "proxy-6d4c8b7f9-jx5tw").expect("known to the mesh");
    assert_eq!(w.protocol, Protocol::Tcp);
    assert_eq!(w.workload_ips, ips(&["10.244.1.20"]));
    assert_eq!(w.canonical_name, "proxy");
    assert_eq!(w.canonical_revision, "latest");
    assert_eq!(
        w.services[&"default/proxy.default.svc.cluster.local".to_string()],
        BTreeMap::from([(80, 8080)])
    );
}

#[test]
fn pending_pod_without_ip_appears_when_it_gets_one() {
    let mut index = fixture_index();
    assert!(pod_wl(&index, "sleep-0").is_none());
    index.take_changes();
    let mut pod = fixture_json("Pod", "sleep-0");
    pod["spec"]["nodeName"] = "node-1".into();
    pod["status"] = serde_json::json!({
        "phase": "Running", "podIP": "10.244.1.30", "podIPs": [{"ip": "10.244.1.30"}],
        "conditions": [{"type": "Ready", "status": "True"}]
    });
    index.apply(obj(pod));
    let w = pod_wl(&index, "sleep-0").expect("a workload once it has an IP");
    assert_eq!(w.workload_ips, ips(&["10.244.1.30"]));
    assert_eq!(w.protocol, Protocol::Hbone);
    let changes = index.take_changes();
    assert_eq!(
        changes.workloads.upserted.keys().collect::<Vec<_>>(),
        vec!["Kubernetes//Pod/default/sleep-0"]
    );
    assert!(changes.services.is_empty());
}

#[test]
fn finished_job_pod_is_no_workload() {
    let index = fixture_index();
    assert!(pod_wl(&index, "migrate-db-q8v2k").is_none());
    let ip: IpAddr = "10.244.2.30".parse().unwrap();
    assert!(index
        .workloads()
        .values()
        .all(|w| !w.workload_ips.contains(&ip)));
}

#[test]
fn host_network_pod_is_never_hbone_nor_indexed_by_ip() {
    let index = fixture_index();
    let w = pod_wl(&index, "node-exporter-h4k9d").expect("known");
    assert_eq!(w.protocol, Protocol::Tcp);
    assert!(w.workload_ips.is_empty(), "the node's IP is not the pod's");
    let node_ip: IpAddr = "10.0.0.1".parse().unwrap();
    assert!(snapshot(&index).workload_by_ip(node_ip).is_none());
}

#[test]
fn pod_outside_ambient_namespace_is_plain_tcp() {
    let index = fixture_index();
    let w = index
        .workloads()
        .get("Kubernetes//Pod/other/legacy-0")
        .expect("every pod with an IP is a workload");
    assert_eq!(w.protocol, Protocol::Tcp);
    assert_eq!(w.canonical_name, "legacy");
    assert_eq!(w.workload_name, "legacy-0");
}

#[test]
fn service_demoapp_has_vip_ports_and_both_slices_endpoints() {
    let index = fixture_index();
    let s = &index.services()[DEMOAPP];
    assert_eq!(s.name, "demoapp");
    assert_eq!(s.hostname, "demoapp.default.svc.cluster.local");
    assert_eq!(s.vips, vec!["/10.96.0.20"]);
    assert_eq!(s.ports, BTreeMap::from([(8080, 8080)]));
    assert_eq!(
        s.app_protocols,
        BTreeMap::from([(8080, "http".to_string())])
    );
    assert!(s.waypoint.is_none());
    let mut endpoints: Vec<&str> = index
        .workloads()
        .values()
        .filter(|w| w.services.contains_key(DEMOAPP))
        .map(|w| w.name.as_str())
        .collect();
    endpoints.sort();
    assert_eq!(
        endpoints,
        vec![
            "demoappv10-7c9d8f6b5-4kq2x",
            "demoappv10-7c9d8f6b5-9zt7m",
            "demoappv10-7c9d8f6b5-b8wqd",
            "demoappv11-5b6f7d9c4-p2lrn",
            "demoappv11-5b6f7d9c4-x7vhc",
        ]
    );
}

#[test]
fn named_target_port_is_resolved_per_pod() {
    let index = fixture_index();
    let s = &index.services()[DEMOAPP_WEB];
    assert_eq!(s.vips, vec!["/10.96.0.21"]);
    assert_eq!(
        s.ports,
        BTreeMap::from([(80, 0)]),
        "named: 0 in the service"
    );
    assert_eq!(s.app_protocols[&80], "http");
    for name in [
        "demoappv10-7c9d8f6b5-4kq2x",
        "demoappv10-7c9d8f6b5-9zt7m",
        "demoappv10-7c9d8f6b5-b8wqd",
    ] {
        let w = pod_wl(&index, name).unwrap();
        assert_eq!(
            w.services[&DEMOAPP_WEB.to_string()],
            BTreeMap::from([(80, 8080)]),
            "{name}"
        );
    }
    let v11 = pod_wl(&index, "demoappv11-5b6f7d9c4-p2lrn").unwrap();
    assert!(!v11.services.contains_key(DEMOAPP_WEB));
    // The data plane reaches the resolved port.
    let snap = snapshot(&index);
    let svc = snap.service_by_key(DEMOAPP_WEB).unwrap().clone();
    let eps = snap.endpoints(&svc, 80);
    assert_eq!(eps.len(), 3);
    assert!(eps.iter().all(|e| e.target_port == 8080));
}

#[test]
fn selectorless_headless_service_gets_workloads_for_its_addresses() {
    let index = fixture_index();
    let s = &index.services()[EXTERNAL_DB];
    assert!(s.vips.is_empty(), "headless");
    assert_eq!(s.ports, BTreeMap::from([(3306, 3306)]));
    let uid = "Kubernetes/discovery.k8s.io/EndpointSlice/default/external-db-8h2kd/10.250.0.10";
    let w = index
        .workloads()
        .get(uid)
        .expect("a workload for the address");
    assert_eq!(w.protocol, Protocol::Tcp);
    assert_eq!(w.workload_ips, ips(&["10.250.0.10"]));
    assert_eq!(w.status, HealthStatus::Healthy);
    assert_eq!(
        w.services[&EXTERNAL_DB.to_string()],
        BTreeMap::from([(3306, 3306)])
    );
}

/// A pod `productpage-v1-abc` running as `bookinfo-productpage`, the service account the
/// fixture's early-form Gateway names.
fn productpage_pod() -> serde_json::Value {
    let mut pod = fixture_json("Pod", "proxy-6d4c8b7f9-jx5tw");
    pod["metadata"]["name"] = "productpage-v1-abc".into();
    pod["metadata"]["annotations"] = serde_json::json!({});
    pod["metadata"]["labels"] = serde_json::json!({"app": "productpage"});
    pod["spec"]["serviceAccountName"] = "bookinfo-productpage".into();
    pod["status"]["podIP"] = "10.244.1.40".into();
    pod["status"]["podIPs"] = serde_json::json!([{"ip": "10.244.1.40"}]);
    pod
}

#[test]
fn early_form_gateway_binds_the_workloads_of_its_service_account() {
    let mut index = fixture_index();
    index.apply(obj(productpage_pod()));
    let w = pod_wl(&index, "productpage-v1-abc").unwrap();
    let wp = w
        .waypoint
        .as_ref()
        .expect("bound through its service account");
    assert_eq!(
        wp.identity.as_ref().unwrap().to_string(),
        "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    );
    assert_eq!(wp.hbone_mtls_port, 15006);
    // No waypoint Service yet: an address the data plane cannot reach (fail closed).
    assert_eq!(wp.destination, "productpage.default.svc.cluster.local");
    let status = index.waypoint_status();
    assert!(
        status
            .iter()
            .any(|s| s.object == "Pod default/productpage-v1-abc"
                && s.message.contains("no Service")),
        "{status:?}"
    );
    // The waypoint's Service appears (labelled with the gateway's name): its VIP.
    index.apply(obj(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "bookinfo-productpage-waypoint", "namespace": "default",
                     "labels": {"gateway.networking.k8s.io/gateway-name": "productpage"}},
        "spec": {"clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.50"],
                 "selector": {"gateway.networking.k8s.io/gateway-name": "productpage"},
                 "ports": [{"name": "mesh", "port": 15008}]}
    })));
    let w = pod_wl(&index, "productpage-v1-abc").unwrap();
    assert_eq!(w.waypoint.as_ref().unwrap().destination, "/10.96.0.50");
    // Other service accounts are not bound.
    assert!(pod_wl(&index, "demoappv10-7c9d8f6b5-4kq2x")
        .unwrap()
        .waypoint
        .is_none());
}

#[test]
fn a_class_held_by_another_controller_binds_nothing() {
    let mut index = fixture_index();
    index.apply(obj(productpage_pod()));
    assert!(pod_wl(&index, "productpage-v1-abc")
        .unwrap()
        .waypoint
        .is_some());
    let class = |controller: &str| {
        obj(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": "istio-mesh"}, "spec": {"controllerName": controller}}))
    };
    // Someone else's `istio-mesh` class: its Gateway is not a waypoint of ours.
    index.apply(class("example.com/gateway-controller"));
    assert!(pod_wl(&index, "productpage-v1-abc")
        .unwrap()
        .waypoint
        .is_none());
    index.apply(class("istio.io/mesh-controller"));
    assert!(pod_wl(&index, "productpage-v1-abc")
        .unwrap()
        .waypoint
        .is_some());
}

#[test]
fn dns_capture_annotation_reaches_the_workload_and_nothing_else_does() {
    let mut index = fixture_index();
    assert!(pod_wl(&index, "demoappv10-7c9d8f6b5-4kq2x")
        .unwrap()
        .dns_capture());
    let mut pod = fixture_json("Pod", "demoappv10-7c9d8f6b5-4kq2x");
    pod["metadata"]["name"] = "no-dns-0".into();
    pod["metadata"]["annotations"] =
        serde_json::json!({"ambient.istio.io/dns-capture": "false", "team": "x"});
    pod["status"]["podIP"] = "10.244.1.41".into();
    pod["status"]["podIPs"] = serde_json::json!([{"ip": "10.244.1.41"}]);
    index.apply(obj(pod));
    let w = pod_wl(&index, "no-dns-0").unwrap();
    assert!(!w.dns_capture());
    assert_eq!(
        w.annotations,
        BTreeMap::from([(
            "ambient.istio.io/dns-capture".to_string(),
            "false".to_string()
        )])
    );
}

#[test]
fn waypoint_pods_are_hbone_and_never_bound() {
    let mut index = fixture_index();
    let mut ns = fixture_json("Namespace", "default");
    ns["metadata"]["labels"]["istio.io/use-waypoint"] = "waypoint".into();
    index.apply(obj(ns));
    let mut pod = fixture_json("Pod", "demoappv10-7c9d8f6b5-4kq2x");
    pod["metadata"]["name"] = "waypoint-5f7c-zz".into();
    pod["metadata"]["labels"] = serde_json::json!({
        "gateway.networking.k8s.io/gateway-name": "waypoint", "istio.io/dataplane-mode": "none"});
    pod["metadata"]["ownerReferences"] = serde_json::json!([]);
    pod["status"]["podIP"] = "10.244.1.50".into();
    pod["status"]["podIPs"] = serde_json::json!([{"ip": "10.244.1.50"}]);
    index.apply(obj(pod));
    let w = pod_wl(&index, "waypoint-5f7c-zz").unwrap();
    assert_eq!(w.protocol, Protocol::Hbone);
    assert!(w.waypoint.is_none());
    // The namespace label binds the services (waypoint-for: service), not the workloads.
    assert!(index.services()[DEMOAPP].waypoint.is_some());
    assert!(pod_wl(&index, "demoappv10-7c9d8f6b5-4kq2x")
        .unwrap()
        .waypoint
        .is_none());
}

#[test]
fn waypoint_for_workload_binds_pods_not_services() {
    let mut index = fixture_index();
    let mut gw = fixture_json("Gateway", "waypoint");
    gw["metadata"]["labels"]["istio.io/waypoint-for"] = "workload".into();
    index.apply(obj(gw));
    let mut ns = fixture_json("Namespace", "default");
    ns["metadata"]["labels"]["istio.io/use-waypoint"] = "waypoint".into();
    index.apply(obj(ns));
    assert!(index.services()[DEMOAPP].waypoint.is_none());
    let w = pod_wl(&index, "demoappv10-7c9d8f6b5-4kq2x").unwrap();
    assert_eq!(
        w.waypoint
            .as_ref()
            .unwrap()
            .identity
            .as_ref()
            .unwrap()
            .to_string(),
        "spiffe://cluster.local/ns/default/sa/waypoint"
    );
    let status = index.waypoint_status();
    assert!(
        status.iter().any(|s| s.object == "Service default/demoapp"
            && !s.bound
            && s.message.contains("workload traffic")),
        "{status:?}"
    );
}

#[test]
fn binding_to_a_missing_gateway_fails_closed() {
    let mut index = fixture_index();
    let mut svc = fixture_json("Service", "demoapp");
    svc["metadata"]["labels"] = serde_json::json!({"istio.io/use-waypoint": "nope"});
    index.apply(obj(svc));
    let wp = index.services()[DEMOAPP]
        .waypoint
        .clone()
        .expect("kept bound: traffic is refused, not sent around the waypoint");
    assert_eq!(wp.destination, "nope.default.svc.cluster.local");
    let status = index.waypoint_status();
    assert_eq!(status.len(), 1, "{status:?}");
    assert!(
        status[0].bound
            && status[0]
                .message
                .contains("no waypoint Gateway default/nope")
    );
    // The data plane refuses a waypoint address it cannot resolve.
    let snap = snapshot(&index);
    let dest = &snap
        .service_by_key(DEMOAPP)
        .unwrap()
        .waypoint
        .as_ref()
        .unwrap()
        .destination;
    assert!(common::snapshot::parse_network_address(dest).is_err());
}

fn policy(spec: serde_json::Value, ns: &str, name: &str) -> Object {
    obj(serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "7"},
        "spec": spec
    }))
}

#[test]
fn authorization_policies_compile_with_scope_and_selected_workloads() {
    let mut index = fixture_index();
    index.apply(policy(
        serde_json::json!({}),
        "istio-system",
        "mesh-allow-nothing",
    ));
    index.apply(policy(
        serde_json::json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}),
        "default",
        "deny-other",
    ));
    index.apply(policy(
        serde_json::json!({"selector": {"matchLabels": {"version": "v1.1"}},
            "rules": [{"to": [{"operation": {"ports": ["8080"], "paths": ["/admin"]}}]}]}),
        "default",
        "v11-admin",
    ));
    let a = index.authorizations();
    assert_eq!(
        a["istio-system/mesh-allow-nothing"].scope,
        PolicyScope::Global
    );
    assert_eq!(a["default/deny-other"].scope, PolicyScope::Namespace);
    assert_eq!(a["default/deny-other"].action, PolicyAction::Deny);
    assert_eq!(a["default/v11-admin"].scope, PolicyScope::WorkloadSelector);
    assert!(a["default/v11-admin"].has_l7_rules);
    // L7 rules: the original object is kept for the waypoint.
    assert!(index
        .configs()
        .contains_key("AuthorizationPolicy/default/v11-admin"));
    assert!(!index
        .configs()
        .contains_key("AuthorizationPolicy/default/deny-other"));
    for (name, selected) in [
        ("demoappv11-5b6f7d9c4-p2lrn", true),
        ("demoappv11-5b6f7d9c4-x7vhc", true),
        ("demoappv10-7c9d8f6b5-4kq2x", false),
    ] {
        let w = pod_wl(&index, name).unwrap();
        let expected: Vec<String> = if selected {
            vec!["default/v11-admin".into()]
        } else {
            vec![]
        };
        assert_eq!(w.authorization_policies, expected, "{name}");
    }
    assert!(index.rejections().is_empty(), "{:?}", index.rejections());
}

#[test]
fn invalid_authorization_policy_is_rejected_alone_and_denies_its_scope() {
    let mut index = fixture_index();
    index.take_changes();
    index.apply(policy(
        serde_json::json!({"selector": {"matchLabels": {"app": "demoapp"}}, "action": "ALLOW",
            "rules": [{"from": [{"source": {"bogusField": ["x"]}}]}]}),
        "default",
        "broken",
    ));
    index.apply(policy(
        serde_json::json!({"action": "AUDIT"}),
        "default",
        "audit",
    ));
    let r = index.rejections();
    assert!(
        r["AuthorizationPolicy/default/broken"].contains("bogusField"),
        "{r:?}"
    );
    assert!(r.contains_key("AuthorizationPolicy/default/audit"), "{r:?}");
    let broken = &index.authorizations()["default/broken"];
    assert_eq!(broken.action, PolicyAction::Deny);
    assert_eq!(broken.scope, PolicyScope::WorkloadSelector);
    assert_eq!(broken.rules, vec![common::model::Rule::default()]);
    let audit = &index.authorizations()["default/audit"];
    assert_eq!(
        (audit.scope, audit.action),
        (PolicyScope::Namespace, PolicyAction::Deny)
    );
    // The stand-in really denies: evaluate a connection to a selected workload.
    let snap = snapshot(&index);
    let dst = pod_wl(&index, "demoappv10-7c9d8f6b5-4kq2x").unwrap();
    assert_eq!(
        dst.authorization_policies,
        vec!["default/broken".to_string()]
    );
    let conn = common::policy::ConnectionInfo {
        src_ip: "10.244.2.40".parse().unwrap(),
        src_identity: None,
        dst: &dst,
        dst_ip: "10.244.1.10".parse().unwrap(),
        dst_port: 8080,
        via_waypoint: true,
    };
    assert!(common::policy::authorize(&snap, &conn).is_err());
    // Fixed: the rejection goes, the real policy replaces the stand-in.
    index.apply(policy(
        serde_json::json!({"selector": {"matchLabels": {"app": "demoapp"}}}),
        "default",
        "broken",
    ));
    assert!(!index
        .rejections()
        .contains_key("AuthorizationPolicy/default/broken"));
    assert_eq!(
        index.authorizations()["default/broken"].action,
        PolicyAction::Allow
    );
}

#[test]
fn peer_authentication_sidecar_and_l7_kinds_are_config_resources() {
    let mut index = fixture_index();
    let pa = serde_json::json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "default"}, "spec": {"mtls": {"mode": "STRICT"}}});
    index.apply(obj(pa.clone()));
    assert_eq!(*index.configs()["PeerAuthentication/default/strict"], pa);
    let bad_pa = serde_json::json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "typo", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "demoapp"}}, "mtls": {"mode": "STRICTT"}}});
    index.apply(obj(bad_pa));
    assert!(index
        .rejections()
        .contains_key("PeerAuthentication/default/typo"));
    let stand_in = &index.configs()["PeerAuthentication/default/typo"];
    assert_eq!(stand_in["spec"]["mtls"]["mode"], "STRICT");
    assert_eq!(
        stand_in["spec"]["selector"]["matchLabels"]["app"],
        "demoapp"
    );
    let dr = serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "demoapp", "namespace": "default"},
        "spec": {"host": "demoapp", "subsets": [{"name": "v10", "labels": {"version": "v1.0"}}]}});
    let vs = serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "demoapp", "namespace": "default"},
        "spec": {"hosts": ["demoapp"], "http": [{"route": [{"destination": {"host": "demoapp", "subset": "v10"}}]}]}});
    // The VirtualService first: its subset is unknown until the DestinationRule arrives.
    index.apply(obj(vs.clone()));
    assert!(index
        .rejections()
        .contains_key("VirtualService/default/demoapp"));
    index.apply(obj(dr));
    assert!(
        !index
            .rejections()
            .contains_key("VirtualService/default/demoapp"),
        "{:?}",
        index.rejections()
    );
    assert_eq!(*index.configs()["VirtualService/default/demoapp"], vs);
    assert!(index
        .configs()
        .contains_key("DestinationRule/default/demoapp"));
    // The configs load with the proxies' loader.
    let text: Vec<String> = index.configs().values().map(|v| v.to_string()).collect();
    let snap = common::config::load_str(&text.join("\n---\n"), "configs").expect("loads");
    assert!(snap.rejected.is_empty(), "{:?}", snap.rejected);
}
