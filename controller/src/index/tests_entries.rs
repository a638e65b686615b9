//! ServiceEntries bound to waypoints: the config resource carries the controller's decision.

use super::tests::{fixture_index, fixture_json, obj};
use super::*;
use common::config::waypoints::BOUND_WAYPOINT_ANNOTATION;
use serde_json::json;

const KEY: &str = "ServiceEntry/default/ext";

fn entry(labels: serde_json::Value, annotations: serde_json::Value) -> Object {
    obj(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "ext", "namespace": "default", "labels": labels,
                     "annotations": annotations},
        "spec": {"hosts": ["api.example.com"], "resolution": "DNS",
                 "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}]}
    }))
}

/// The waypoint address the controller attached to the entry, if any.
fn bound_to(index: &Index) -> Option<serde_json::Value> {
    let v = index
        .configs()
        .get(KEY)
        .expect("the entry is a config resource");
    let text = v
        .pointer("/metadata/annotations")?
        .get(BOUND_WAYPOINT_ANNOTATION)?;
    Some(serde_json::from_str(text.as_str().expect("a string")).expect("JSON"))
}

fn waypoint_service() -> Object {
    obj(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "waypoint", "namespace": "default",
                     "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}},
        "spec": {"clusterIP": "10.96.0.60", "clusterIPs": ["10.96.0.60"],
                 "ports": [{"name": "mesh", "port": 15008, "appProtocol": "hbone"}]}
    }))
}

#[test]
fn labelled_entry_is_sent_with_its_waypoint_and_follows_the_waypoint_service() {
    let mut index = fixture_index();
    index.apply(entry(
        json!({"istio.io/use-waypoint": "waypoint"}),
        json!({}),
    ));
    let c = index.take_changes();
    assert!(c.configs.upserted.contains_key(KEY));
    let gw = bound_to(&index).expect("bound");
    assert_eq!(gw["destination"], "waypoint.default.svc.cluster.local");
    assert_eq!(gw["hboneMtlsPort"], index.config().waypoint_port);

    // The waypoint's Service appears: the entry is sent again with its VIP.
    index.apply(waypoint_service());
    let c = index.take_changes();
    assert!(c.configs.upserted.contains_key(KEY), "{:?}", c.configs);
    assert_eq!(bound_to(&index).unwrap()["destination"], "/10.96.0.60");

    // The label goes: so does the binding, and a user's own annotation never counts.
    index.apply(entry(
        json!({}),
        json!({BOUND_WAYPOINT_ANNOTATION: "{\"destination\": \"/10.0.0.66\"}"}),
    ));
    index.take_changes();
    assert_eq!(bound_to(&index), None);
    assert_eq!(
        index.configs()[KEY]["spec"]["hosts"][0],
        "api.example.com",
        "the rest of the object is sent as it is"
    );
}

#[test]
fn namespace_label_binds_entries_unless_they_opt_out() {
    let mut index = fixture_index();
    index.apply(entry(json!({}), json!({})));
    assert_eq!(bound_to(&index), None);
    let mut ns = fixture_json("Namespace", "default");
    ns["metadata"]["labels"]["istio.io/use-waypoint"] = "waypoint".into();
    index.apply(obj(ns));
    index.take_changes();
    assert!(bound_to(&index).is_some(), "bound through its namespace");
    index.apply(entry(json!({"istio.io/use-waypoint": "none"}), json!({})));
    assert_eq!(bound_to(&index), None, "`none` opts the entry out");
    index.delete(&ObjectRef {
        kind: Kind::ServiceEntry,
        namespace: "default".into(),
        name: "ext".into(),
    });
    let c = index.take_changes();
    assert!(c.configs.removed.contains(KEY), "{:?}", c.configs);
}

/// The Address resources made from an entry, for an Istio ztunnel.
#[test]
fn entries_are_also_sent_as_istio_addresses_and_removed_with_the_entry() {
    use common::xds::SERVICE_ENTRY_MARKER;
    let mut index = fixture_index();
    index.take_changes();
    index.apply(obj(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "db", "namespace": "default",
                     "labels": {"istio.io/use-waypoint": "waypoint"}},
        "spec": {"hosts": ["db.example.com"], "addresses": ["240.0.0.10"],
                 "location": "MESH_EXTERNAL", "resolution": "STATIC",
                 "ports": [{"number": 5432, "name": "tcp", "protocol": "TCP",
                            "targetPort": 6432}],
                 "endpoints": [{"address": "192.0.2.7", "weight": 3,
                                "labels": {"version": "v1"}},
                               // A pod's address: the pod's own workload stays its only owner.
                               {"address": "10.244.1.10"}]}
    })));
    index.apply(entry(json!({}), json!({})));
    index.apply(waypoint_service());
    let c = index.take_changes();

    let db = c
        .services
        .upserted
        .get("default/db.example.com")
        .expect("the STATIC entry's host is a service");
    assert_eq!(db.vips, vec!["/240.0.0.10"]);
    assert_eq!(db.ports.get(&5432), Some(&6432));
    assert_eq!(
        db.waypoint.as_ref().map(|w| w.destination.as_str()),
        Some("/10.96.0.60"),
        "bound through the entry's label"
    );
    let proto = common::xds::convert::service_to_proto(db).expect("converts");
    assert!(proto
        .extensions
        .iter()
        .any(|e| e.name == SERVICE_ENTRY_MARKER));

    let ep_uid = "Kubernetes/networking.istio.io/ServiceEntry/default/db/192.0.2.7";
    let ep = c.workloads.upserted.get(ep_uid).expect("endpoint workload");
    assert_eq!(
        ep.workload_ips,
        vec!["192.0.2.7".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert_eq!(ep.protocol, common::model::Protocol::Tcp);
    assert_eq!(ep.capacity, Some(3));
    assert_eq!(ep.labels.get("version").map(String::as_str), Some("v1"));
    assert_eq!(
        ep.services.get("default/db.example.com"),
        Some(&[(5432, 6432)].into())
    );
    assert_eq!(
        ep.annotations.get(SERVICE_ENTRY_MARKER).map(String::as_str),
        Some("default/db")
    );
    assert!(
        !c.workloads
            .upserted
            .keys()
            .any(|u| u.ends_with("/10.244.1.10")),
        "no second workload on a pod's address: {:?}",
        c.workloads.upserted.keys()
    );

    // The DNS entry without endpoints: its automatic VIP and a workload resolving its host.
    let api = c
        .services
        .upserted
        .get("default/api.example.com")
        .expect("the DNS entry's host is a service");
    let vip = common::vip::allocate(vec![("default", "api.example.com")]);
    let vip = vip[&("default".to_string(), "api.example.com".to_string())];
    assert_eq!(
        api.vips,
        vec![format!("/{vip}")],
        "the VIP every proxy allocates"
    );
    assert!(api.waypoint.is_none());
    let dns = c
        .workloads
        .upserted
        .get("Kubernetes/networking.istio.io/ServiceEntry/default/ext/api.example.com")
        .expect("hostname workload");
    assert_eq!(dns.hostname, "api.example.com");
    assert_eq!(dns.trust_domain, index.config().trust_domain);
    assert!(dns.workload_ips.is_empty());
    assert_eq!(
        dns.services.get("default/api.example.com"),
        Some(&[(80, 80)].into())
    );

    // Deleting the entry removes what it made; a Kubernetes Service of the same name is kept.
    index.delete(&ObjectRef {
        kind: Kind::ServiceEntry,
        namespace: "default".into(),
        name: "db".into(),
    });
    let c = index.take_changes();
    assert!(c.services.removed.contains("default/db.example.com"));
    assert!(c.workloads.removed.contains(ep_uid));
    assert!(index.services().contains_key("default/api.example.com"));
}

#[test]
fn an_entry_never_replaces_a_kubernetes_service_of_the_same_name() {
    let mut index = fixture_index();
    let before = index.services()["default/demoapp.default.svc.cluster.local"].clone();
    index.apply(obj(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "shadow", "namespace": "default"},
        "spec": {"hosts": ["demoapp.default.svc.cluster.local"], "addresses": ["240.0.0.11"],
                 "resolution": "STATIC", "ports": [{"number": 80, "name": "http"}],
                 "endpoints": [{"address": "192.0.2.8"}]}
    })));
    assert_eq!(
        index.services()["default/demoapp.default.svc.cluster.local"],
        before
    );
}

/// A `workloadSelector` entry makes the selected pods endpoints of its hosts, as istiod does,
/// and only those of its namespace; removing it takes the host away again.
#[test]
fn selected_pods_list_the_entry_hosts() {
    let mut index = fixture_index();
    index.take_changes();
    let demoapp_pods = |index: &Index| -> Vec<Arc<Workload>> {
        index
            .workloads()
            .values()
            .filter(|w| {
                w.namespace == "default"
                    && w.labels.get("app").map(String::as_str) == Some("demoapp")
            })
            .cloned()
            .collect()
    };
    assert!(!demoapp_pods(&index).is_empty(), "fixture has demoapp pods");
    index.apply(obj(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "internal", "namespace": "default"},
        "spec": {"hosts": ["demo.internal"], "location": "MESH_INTERNAL",
                 "resolution": "STATIC", "workloadSelector": {"labels": {"app": "demoapp"}},
                 "ports": [{"number": 80, "name": "http", "targetPort": 8080}]}
    })));
    let c = index.take_changes();
    for w in demoapp_pods(&index) {
        assert_eq!(
            w.services.get("default/demo.internal"),
            Some(&[(80, 8080)].into()),
            "{}",
            w.uid
        );
        assert!(
            c.workloads.upserted.contains_key(&w.uid),
            "re-sent: {}",
            w.uid
        );
    }
    assert!(
        index
            .workloads()
            .values()
            .filter(|w| w.labels.get("app").map(String::as_str) != Some("demoapp"))
            .all(|w| !w.services.contains_key("default/demo.internal")),
        "only the selected pods"
    );
    assert!(index.services().contains_key("default/demo.internal"));

    index.delete(&ObjectRef {
        kind: Kind::ServiceEntry,
        namespace: "default".into(),
        name: "internal".into(),
    });
    index.take_changes();
    assert!(demoapp_pods(&index)
        .iter()
        .all(|w| !w.services.contains_key("default/demo.internal")));
    assert!(!index.services().contains_key("default/demo.internal"));
}
