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
