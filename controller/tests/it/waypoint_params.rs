//! Waypoint parameters end to end against the fake API server: HPA annotations update the
//! HPA, turning the HPA or PDB off deletes it, a parametersRef ConfigMap change applies, a
//! Gateway of another class is ignored, and bad values reject only their Gateway with a clear
//! message and nothing applied.

use crate::waypoint_support::*;
use serde_json::json;
use std::time::Duration;

fn hpa(h: &Harness, ns: &str, name: &str) -> Option<(i64, i64, i64)> {
    let o = h.get("autoscaling/v2", "HorizontalPodAutoscaler", ns, name)?;
    let s = &o["spec"];
    Some((
        s["minReplicas"].as_i64()?,
        s["maxReplicas"].as_i64()?,
        s["metrics"][0]["resource"]["target"]["averageUtilization"].as_i64()?,
    ))
}

fn set_annotations(h: &Harness, ns: &str, name: &str, annotations: serde_json::Value) {
    let mut gw = h.gateway(ns, name).expect("gateway");
    gw["metadata"]["annotations"] = annotations;
    if let Some(m) = gw["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    h.server.update(gw).expect("update gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpa_annotations_update_and_disabling_deletes() {
    let h = Harness::start(true, Duration::from_secs(3600)).await;
    h.server
        .create(waypoint_gateway("bookinfo", "wp", json!({})))
        .expect("gateway");
    eventually("default HPA", 20, || {
        hpa(&h, "bookinfo", "wp") == Some((2, 10, 80))
    })
    .await;

    set_annotations(
        &h,
        "bookinfo",
        "wp",
        json!({"autoscaling.ambient.io/min-replicas": "3",
               "autoscaling.ambient.io/max-replicas": "6",
               "autoscaling.ambient.io/target-cpu-utilization": "60"}),
    );
    eventually("HPA updated", 10, || {
        hpa(&h, "bookinfo", "wp") == Some((3, 6, 60))
    })
    .await;

    set_annotations(
        &h,
        "bookinfo",
        "wp",
        json!({"autoscaling.ambient.io/enabled": "false", "ambient.io/pod-disruption-budget": "false"}),
    );
    eventually("HPA and PDB deleted", 10, || {
        h.present("bookinfo", "wp", "wp") == vec!["ServiceAccount", "Deployment", "Service"]
    })
    .await;

    // On again: both come back.
    set_annotations(&h, "bookinfo", "wp", json!({}));
    eventually("HPA and PDB back", 10, || {
        h.present("bookinfo", "wp", "wp").len() == 5
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_ref_configmap_drives_the_hpa() {
    let h = Harness::start(true, Duration::from_secs(3600)).await;
    h.server
        .create(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "wp-params", "namespace": "bookinfo"},
            "data": {"min-replicas": "4", "max-replicas": "9"}}))
        .expect("configmap");
    let mut gw = waypoint_gateway("bookinfo", "wp", json!({}));
    gw["spec"]["infrastructure"] =
        json!({"parametersRef": {"group": "", "kind": "ConfigMap", "name": "wp-params"}});
    h.server.create(gw).expect("gateway");
    eventually("HPA from the ConfigMap", 20, || {
        hpa(&h, "bookinfo", "wp") == Some((4, 9, 80))
    })
    .await;
    let mut cm = h
        .get("v1", "ConfigMap", "bookinfo", "wp-params")
        .expect("configmap");
    cm["data"]["max-replicas"] = json!("12");
    h.server.update(cm).expect("update configmap");
    eventually("HPA follows the ConfigMap", 10, || {
        hpa(&h, "bookinfo", "wp") == Some((4, 12, 80))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_classes_are_ignored_and_bad_values_reject_only_their_gateway() {
    let h = Harness::start(true, Duration::from_secs(3600)).await;
    let mut other = waypoint_gateway("bookinfo", "ingress", json!({}));
    other["spec"]["gatewayClassName"] = json!("istio");
    h.server.create(other).expect("other-class gateway");
    h.server
        .create(waypoint_gateway(
            "bookinfo",
            "bad",
            json!({"autoscaling.ambient.io/min-replicas": "lots"}),
        ))
        .expect("bad gateway");
    h.server
        .create(waypoint_gateway("bookinfo", "good", json!({})))
        .expect("good gateway");

    eventually("the good Gateway is served", 20, || {
        h.present("bookinfo", "good", "good").len() == 5
            && h.condition("bookinfo", "good", "Accepted")
                .is_some_and(|a| a["status"] == "True")
    })
    .await;
    eventually("the bad Gateway is rejected with the reason", 10, || {
        h.condition("bookinfo", "bad", "Accepted").is_some_and(|a| {
            a["status"] == "False"
                && a["reason"] == "InvalidParameters"
                && a["message"]
                    == "annotation autoscaling.ambient.io/min-replicas: \"lots\" is not a whole number"
        })
    })
    .await;
    assert!(
        h.present("bookinfo", "bad", "bad").is_empty(),
        "nothing half-applied"
    );
    // Queue order is by time: by now the other-class Gateway was long seen, and ignored.
    assert!(h.present("bookinfo", "ingress", "ingress").is_empty());
    assert!(h
        .gateway("bookinfo", "ingress")
        .expect("gw")
        .get("status")
        .is_none());

    // Fixing the value serves it.
    set_annotations(
        &h,
        "bookinfo",
        "bad",
        json!({"autoscaling.ambient.io/min-replicas": "2"}),
    );
    eventually("the fixed Gateway is served", 10, || {
        h.present("bookinfo", "bad", "bad").len() == 5
            && h.condition("bookinfo", "bad", "Accepted")
                .is_some_and(|a| a["status"] == "True")
    })
    .await;
}
