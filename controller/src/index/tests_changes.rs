//! The change feed: what `take_changes` reports after watch events (scale up, pod deletion in
//! both orders against its EndpointSlice, a namespace leaving ambient, a waypoint label coming
//! and going), and that unchanged outputs are not reported.

use super::tests::{fixture_index, fixture_json, obj, pod_wl, DEMOAPP, DEMOAPP_WEB};
use super::*;
use common::model::Protocol;
use serde_json::json;

fn upserted<T>(d: &Delta<T>) -> Vec<&str> {
    d.upserted.keys().map(String::as_str).collect()
}

fn removed<T>(d: &Delta<T>) -> Vec<&str> {
    d.removed.iter().map(String::as_str).collect()
}

const V10_A: &str = "Kubernetes//Pod/default/demoappv10-7c9d8f6b5-4kq2x";

#[test]
fn initial_changes_list_everything_once_then_nothing() {
    let mut index = fixture_index();
    let first = index.take_changes();
    assert_eq!(first.workloads.upserted.len(), index.workloads().len());
    assert_eq!(first.services.upserted.len(), 4);
    assert!(first.workloads.removed.is_empty());
    assert!(index.take_changes().is_empty());
    // Re-applying identical objects (a re-list) changes nothing.
    for o in super::tests::fixture_objects() {
        index.apply(o);
    }
    assert!(index.take_changes().is_empty());
}

#[test]
fn scale_up_new_pod_then_slice_update() {
    let mut index = fixture_index();
    index.take_changes();
    let mut pod = fixture_json("Pod", "demoappv11-5b6f7d9c4-p2lrn");
    pod["metadata"]["name"] = "demoappv11-5b6f7d9c4-n3w9k".into();
    pod["metadata"]["uid"] = "9e0c1a00-0000-4000-8000-000000000113".into();
    pod["status"]["podIP"] = "10.244.2.12".into();
    pod["status"]["podIPs"] = json!([{"ip": "10.244.2.12"}]);
    index.apply(obj(pod));
    let c = index.take_changes();
    let uid = "Kubernetes//Pod/default/demoappv11-5b6f7d9c4-n3w9k";
    assert_eq!(upserted(&c.workloads), vec![uid]);
    assert!(
        c.workloads.upserted[uid].services.is_empty(),
        "not in a slice yet"
    );
    assert!(c.services.is_empty() && c.authorizations.is_empty());

    let mut slice = fixture_json("EndpointSlice", "demoapp-m3q9z");
    slice["endpoints"].as_array_mut().unwrap().push(json!({
        "addresses": ["10.244.2.12"], "conditions": {"ready": true, "serving": true, "terminating": false},
        "nodeName": "node-2", "targetRef": {"kind": "Pod", "namespace": "default", "name": "demoappv11-5b6f7d9c4-n3w9k"}}));
    index.apply(obj(slice));
    let c = index.take_changes();
    assert_eq!(
        upserted(&c.workloads),
        vec![uid],
        "only the new endpoint changes"
    );
    assert_eq!(
        c.workloads.upserted[uid].services[&DEMOAPP.to_string()],
        BTreeMap::from([(8080, 8080)])
    );
    assert!(c.services.is_empty());
}

fn slice_without_v10_a() -> Object {
    let mut slice = fixture_json("EndpointSlice", "demoapp-k7x2p");
    slice["endpoints"]
        .as_array_mut()
        .unwrap()
        .retain(|e| e["targetRef"]["name"] != "demoappv10-7c9d8f6b5-4kq2x");
    obj(slice)
}

fn pod_ref() -> ObjectRef {
    ObjectRef::new(Kind::Pod, "default", "demoappv10-7c9d8f6b5-4kq2x")
}

#[test]
fn delete_pod_slice_first_then_pod() {
    let mut index = fixture_index();
    index.take_changes();
    index.apply(slice_without_v10_a());
    let c = index.take_changes();
    assert_eq!(upserted(&c.workloads), vec![V10_A]);
    let w = &c.workloads.upserted[V10_A];
    assert!(!w.services.contains_key(DEMOAPP));
    assert!(
        w.services.contains_key(DEMOAPP_WEB),
        "still in the other service's slice"
    );
    index.delete(&pod_ref());
    let c = index.take_changes();
    assert!(c.workloads.upserted.is_empty());
    assert_eq!(removed(&c.workloads), vec![V10_A]);
    assert!(c.services.is_empty());
}

#[test]
fn delete_pod_first_then_slice() {
    let mut index = fixture_index();
    index.take_changes();
    index.delete(&pod_ref());
    let c = index.take_changes();
    assert_eq!(removed(&c.workloads), vec![V10_A]);
    assert!(c.workloads.upserted.is_empty());
    index.apply(slice_without_v10_a());
    assert!(
        index.take_changes().is_empty(),
        "the slice update changes no output"
    );
    assert!(pod_wl(&index, "demoappv10-7c9d8f6b5-4kq2x").is_none());
    // Deleting something unknown is harmless.
    index.delete(&pod_ref());
    assert!(index.take_changes().is_empty());
}

#[test]
fn added_then_removed_before_take_reports_removal_only() {
    let mut index = fixture_index();
    index.take_changes();
    index.delete(&pod_ref());
    let mut pod = fixture_json("Pod", "demoappv10-7c9d8f6b5-4kq2x");
    index.apply(obj(pod.clone()));
    pod["metadata"]["labels"]["extra"] = "1".into();
    index.apply(obj(pod));
    index.delete(&pod_ref());
    let c = index.take_changes();
    assert_eq!(removed(&c.workloads), vec![V10_A]);
    assert!(c.workloads.upserted.is_empty());
}

#[test]
fn namespace_leaving_ambient_turns_its_pods_to_tcp() {
    let mut index = fixture_index();
    let hbone: BTreeSet<String> = index
        .workloads()
        .iter()
        .filter(|(_, w)| w.protocol == Protocol::Hbone)
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(hbone.len(), 5);
    index.take_changes();
    let mut ns = fixture_json("Namespace", "default");
    ns["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("istio.io/dataplane-mode");
    index.apply(obj(ns.clone()));
    let c = index.take_changes();
    let changed: BTreeSet<String> = c.workloads.upserted.keys().cloned().collect();
    assert_eq!(changed, hbone, "exactly the mesh pods change");
    assert!(c
        .workloads
        .upserted
        .values()
        .all(|w| w.protocol == Protocol::Tcp));
    assert!(c.services.is_empty());
    // And back.
    ns["metadata"]["labels"]["istio.io/dataplane-mode"] = "ambient".into();
    index.apply(obj(ns));
    let c = index.take_changes();
    assert_eq!(c.workloads.upserted.len(), 5);
    assert!(c
        .workloads
        .upserted
        .values()
        .all(|w| w.protocol == Protocol::Hbone));
}

#[test]
fn pod_update_recomputes_only_that_workload() {
    let mut index = fixture_index();
    index.take_changes();
    let mut pod = fixture_json("Pod", "demoappv10-7c9d8f6b5-4kq2x");
    pod["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    pod["metadata"]["resourceVersion"] = "9999".into();
    index.apply(obj(pod));
    let c = index.take_changes();
    assert_eq!(upserted(&c.workloads), vec![V10_A]);
    assert_eq!(
        c.workloads.upserted[V10_A].status,
        common::model::HealthStatus::Unhealthy
    );
    assert!(c.services.is_empty());
}

#[test]
fn use_waypoint_label_on_service_binds_and_unbinds() {
    let mut index = fixture_index();
    index.take_changes();
    let original = fixture_json("Service", "demoapp");
    let mut labelled = original.clone();
    labelled["metadata"]["labels"] = json!({"istio.io/use-waypoint": "waypoint"});
    index.apply(obj(labelled));
    let c = index.take_changes();
    assert_eq!(upserted(&c.services), vec![DEMOAPP]);
    assert!(
        c.workloads.is_empty(),
        "waypoint-for service binds services only"
    );
    let wp = c.services.upserted[DEMOAPP]
        .waypoint
        .clone()
        .expect("bound");
    assert_eq!(
        wp.destination, "waypoint.default.svc.cluster.local",
        "no Service yet"
    );
    assert_eq!(
        wp.identity.unwrap().to_string(),
        "spiffe://cluster.local/ns/default/sa/waypoint"
    );
    // The waypoint's Service appears: the binding moves to its VIP.
    index.apply(obj(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "waypoint", "namespace": "default",
                     "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint",
                                "gateway.istio.io/managed": "istio.io-mesh-controller"}},
        "spec": {"clusterIP": "10.96.0.60", "clusterIPs": ["10.96.0.60"],
                 "ports": [{"name": "mesh", "port": 15008, "appProtocol": "hbone"}]}
    })));
    let c = index.take_changes();
    let keys = upserted(&c.services);
    assert_eq!(
        keys,
        vec![DEMOAPP, "default/waypoint.default.svc.cluster.local"]
    );
    assert_eq!(
        c.services.upserted[DEMOAPP]
            .waypoint
            .as_ref()
            .unwrap()
            .destination,
        "/10.96.0.60"
    );
    assert!(
        c.services.upserted["default/waypoint.default.svc.cluster.local"]
            .waypoint
            .is_none(),
        "the waypoint's own Service is never bound"
    );
    // Label removed: the binding disappears.
    index.apply(obj(original));
    let c = index.take_changes();
    assert_eq!(upserted(&c.services), vec![DEMOAPP]);
    assert!(c.services.upserted[DEMOAPP].waypoint.is_none());
    assert!(index.waypoint_status().is_empty());
}

#[test]
fn selector_policy_change_touches_only_its_namespace() {
    let mut index = fixture_index();
    index.take_changes();
    index.apply(obj(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "v10", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"version": "v1.0"}}}
    })));
    let c = index.take_changes();
    assert_eq!(upserted(&c.authorizations), vec!["default/v10"]);
    let mut changed = upserted(&c.workloads);
    changed.sort();
    assert_eq!(changed.len(), 3, "the three v1.0 pods: {changed:?}");
    assert!(c
        .workloads
        .upserted
        .values()
        .all(|w| w.authorization_policies == vec!["default/v10".to_string()]));
    index.delete(&ObjectRef::new(Kind::AuthorizationPolicy, "default", "v10"));
    let c = index.take_changes();
    assert_eq!(removed(&c.authorizations), vec!["default/v10"]);
    assert_eq!(c.workloads.upserted.len(), 3);
    assert!(c
        .workloads
        .upserted
        .values()
        .all(|w| w.authorization_policies.is_empty()));
}
