//! The waypoint controller against the fake API server (no garbage collector: what disappears
//! was deleted by the controller): objects for both Gateway forms with owner references and
//! our label, status Programmed False → True when a waypoint pod is Ready, explicit deletion,
//! no overwriting of objects that are not ours, and nothing done without the lease.

use crate::waypoint_support::*;
use serde_json::json;
use std::time::Duration;

const MANAGED: &str = "gateway.istio.io/managed";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_forms_get_their_objects_then_programmed_then_deleted() {
    let h = Harness::start(true, Duration::from_secs(3600)).await;
    h.server
        .create(waypoint_gateway("bookinfo", "reviews-wp", json!({})))
        .expect("gateway");
    // The seed's istio-mesh Gateway, as the users have it (namespace default).
    h.server
        .apply_yaml(&seed_gateway_yaml())
        .expect("seed gateway");

    let cases = [
        ("bookinfo", "reviews-wp", "reviews-wp", "reviews-wp"),
        (
            "default",
            "productpage",
            "productpage-waypoint",
            "bookinfo-productpage",
        ),
    ];
    for (ns, gw, name, sa) in cases {
        eventually(&format!("{ns}/{gw}: all five objects"), 20, || {
            h.present(ns, name, sa).len() == 5
        })
        .await;
        let uid = h.gateway(ns, gw).expect("gateway")["metadata"]["uid"].clone();
        for (api, kind) in KINDS {
            let n = if kind == "ServiceAccount" { sa } else { name };
            let o = h.get(api, kind, ns, n).expect("object");
            let m = &o["metadata"];
            assert_eq!(m["labels"][MANAGED], "istio.io-mesh-controller", "{kind}");
            assert_eq!(
                m["labels"]["gateway.networking.k8s.io/gateway-name"], gw,
                "{kind}"
            );
            let owner = &m["ownerReferences"][0];
            assert_eq!(owner["kind"], "Gateway", "{kind}");
            assert_eq!(owner["uid"], uid, "{kind}");
            assert_eq!(owner["controller"], true, "{kind}");
            assert_eq!(owner["blockOwnerDeletion"], true, "{kind}");
        }
        let d = h
            .get("apps/v1", "Deployment", ns, name)
            .expect("deployment");
        assert!(d["spec"].get("replicas").is_none());
        assert_eq!(d["spec"]["template"]["spec"]["serviceAccountName"], sa);
        eventually(
            &format!("{ns}/{gw}: Accepted, not yet Programmed"),
            10,
            || {
                let a = h.condition(ns, gw, "Accepted");
                let p = h.condition(ns, gw, "Programmed");
                a.is_some_and(|a| a["status"] == "True" && a["reason"] == "Accepted")
                    && p.is_some_and(|p| {
                        p["status"] == "False" && p["reason"] == "AddressNotUsable"
                    })
            },
        )
        .await;
    }
    // The built-in classes exist.
    for class in ["istio-waypoint", "istio-mesh"] {
        let c = h
            .server
            .get(GW, "GatewayClass", None, class)
            .expect("class");
        assert_eq!(c["spec"]["controllerName"], "istio.io/mesh-controller");
    }
    // The canonical Gateway's listener is reported.
    let gw = h.gateway("bookinfo", "reviews-wp").expect("gateway");
    assert_eq!(gw["status"]["listeners"][0]["name"], "mesh");

    // A Ready waypoint pod appears for each: Programmed, with the Service's addresses.
    for (ns, gw, name, _) in cases {
        h.ready_pod(ns, gw, &format!("{name}-abc12"));
        eventually(&format!("{ns}/{gw}: Programmed"), 10, || {
            h.condition(ns, gw, "Programmed")
                .is_some_and(|p| p["status"] == "True" && p["reason"] == "Programmed")
        })
        .await;
        let svc = h.get("v1", "Service", ns, name).expect("service");
        let ip = svc["spec"]["clusterIP"]
            .as_str()
            .expect("allocated cluster IP");
        let status = &h.gateway(ns, gw).expect("gateway")["status"];
        assert_eq!(
            status["addresses"],
            json!([{"type": "IPAddress", "value": ip},
                   {"type": "Hostname", "value": format!("{name}.{ns}.svc.cluster.local")}])
        );
        let p = h.condition(ns, gw, "Programmed").expect("programmed");
        assert_eq!(p["observedGeneration"], 1);
    }

    // Status is written only when it changes: nothing more while nothing changes.
    let writes = || {
        h.server
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/status") && r.method == "PATCH")
            .count()
    };
    let before = writes();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(writes(), before, "no status write storm");

    // Deleting a Gateway removes its objects (here GC is off: the controller deletes them).
    for (ns, gw, name, sa) in cases {
        h.server
            .delete(GW, "Gateway", Some(ns), gw)
            .expect("delete");
        eventually(&format!("{ns}/{gw}: objects deleted"), 10, || {
            h.present(ns, name, sa).is_empty()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_that_is_not_ours_is_not_overwritten() {
    // Short resync: the conflicting (unlabelled) object is invisible to our watches.
    let h = Harness::start(true, Duration::from_secs(1)).await;
    h.server
        .create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "ratings-wp", "namespace": "bookinfo", "labels": {"app": "mine"}},
            "spec": {"ports": [{"port": 80}], "selector": {"app": "mine"}}}))
        .expect("user's service");
    h.server
        .create(waypoint_gateway("bookinfo", "ratings-wp", json!({})))
        .expect("gateway");
    eventually("Accepted=False naming the Service", 10, || {
        h.condition("bookinfo", "ratings-wp", "Accepted")
            .is_some_and(|a| {
                a["status"] == "False"
                    && a["reason"] == "ResourceConflict"
                    && a["message"].as_str().is_some_and(|m| {
                        m.contains("Service bookinfo/ratings-wp exists and is not managed")
                    })
            })
    })
    .await;
    let svc = h
        .get("v1", "Service", "bookinfo", "ratings-wp")
        .expect("service");
    assert!(
        svc["metadata"]["labels"].get(MANAGED).is_none(),
        "not adopted"
    );
    assert_eq!(
        svc["spec"]["selector"],
        json!({"app": "mine"}),
        "not overwritten"
    );
    // Nothing half-applied.
    assert_eq!(
        h.present("bookinfo", "ratings-wp", "ratings-wp"),
        vec!["Service"]
    );

    // The user removes their Service: the waypoint is made and accepted.
    h.server
        .delete("v1", "Service", Some("bookinfo"), "ratings-wp")
        .expect("delete");
    eventually("objects after the conflict is gone", 15, || {
        h.present("bookinfo", "ratings-wp", "ratings-wp").len() == 5
    })
    .await;
    eventually("Accepted=True", 10, || {
        h.condition("bookinfo", "ratings-wp", "Accepted")
            .is_some_and(|a| a["status"] == "True")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_early_forms_existing_service_account_is_used_as_is() {
    let h = Harness::start(true, Duration::from_secs(3600)).await;
    h.server
        .create(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "bookinfo-productpage", "namespace": "default"}}))
        .expect("the app's service account");
    h.server
        .apply_yaml(&seed_gateway_yaml())
        .expect("seed gateway");
    eventually("Deployment, Service, HPA, PDB", 20, || {
        h.present("default", "productpage-waypoint", "bookinfo-productpage")
            .len()
            == 5
    })
    .await;
    let sa = h
        .get("v1", "ServiceAccount", "default", "bookinfo-productpage")
        .expect("sa");
    assert!(
        sa["metadata"].get("labels").is_none(),
        "the app's SA is not taken over"
    );
    assert!(sa["metadata"].get("ownerReferences").is_none());
    eventually("Accepted=True", 10, || {
        h.condition("default", "productpage", "Accepted")
            .is_some_and(|a| a["status"] == "True")
    })
    .await;
    // Deleting the Gateway leaves the app's service account alone.
    h.server
        .delete(GW, "Gateway", Some("default"), "productpage")
        .expect("delete");
    eventually("waypoint objects deleted", 10, || {
        h.get("apps/v1", "Deployment", "default", "productpage-waypoint")
            .is_none()
    })
    .await;
    assert!(h
        .get("v1", "ServiceAccount", "default", "bookinfo-productpage")
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_reconciles() {
    let h = Harness::start(false, Duration::from_secs(3600)).await;
    h.server
        .create(waypoint_gateway("bookinfo", "a", json!({})))
        .expect("gateway");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        h.present("bookinfo", "a", "a").is_empty(),
        "not leading: nothing"
    );
    assert!(h.condition("bookinfo", "a", "Accepted").is_none());
    h.leader.send_replace(true);
    eventually("objects once leading", 20, || {
        h.present("bookinfo", "a", "a").len() == 5
    })
    .await;
    h.leader.send_replace(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.server
        .create(waypoint_gateway("bookinfo", "b", json!({})))
        .expect("gateway");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        h.present("bookinfo", "b", "b").is_empty(),
        "lease lost: stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_classes_decide_which_gateways_are_ours() {
    let h = Harness::start(true, Duration::from_secs(3600)).await;
    let class = |name: &str| h.server.get(GW, "GatewayClass", None, name);
    eventually("built-in classes created", 10, || {
        class("istio-waypoint").is_some() && class("istio-mesh").is_some()
    })
    .await;
    // The built-in name handed to another controller, and a class of our own with another name.
    let mut taken = class("istio-waypoint").expect("class");
    taken["spec"]["controllerName"] = json!("example.com/gateway-controller");
    h.server.update(taken).expect("update class");
    h.server
        .create(json!({"apiVersion": GW, "kind": "GatewayClass",
            "metadata": {"name": "team-waypoints"},
            "spec": {"controllerName": "istio.io/mesh-controller"}}))
        .expect("class");
    let accepted = |name: &str| {
        class(name).and_then(|c| {
            c["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Accepted").cloned())
        })
    };
    // Seen in order by the controller: once the new class is Accepted, the change of the
    // built-in one is known too.
    eventually("our class Accepted", 10, || {
        accepted("team-waypoints").is_some_and(|a| a["status"] == "True")
    })
    .await;
    let mut team = waypoint_gateway("bookinfo", "team-wp", json!({}));
    team["spec"]["gatewayClassName"] = json!("team-waypoints");
    h.server.create(team).expect("gateway");
    h.server
        .create(waypoint_gateway("bookinfo", "taken-wp", json!({})))
        .expect("gateway");
    eventually("a class with our controllerName is ours", 20, || {
        h.present("bookinfo", "team-wp", "team-wp").len() == 5
    })
    .await;
    // The Gateway of the class another controller now owns gets nothing, and no status from us
    // (its reconcile was queued right after team-wp's; give it time to do something wrong).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(h.present("bookinfo", "taken-wp", "taken-wp").is_empty());
    assert!(h.condition("bookinfo", "taken-wp", "Accepted").is_none());
    assert!(accepted("istio-waypoint").is_none());
    // Handed back: it becomes ours.
    let mut back = class("istio-waypoint").expect("class");
    back["spec"]["controllerName"] = json!("istio.io/mesh-controller");
    h.server.update(back).expect("update class");
    eventually("the class handed back makes its Gateway ours", 20, || {
        h.present("bookinfo", "taken-wp", "taken-wp").len() == 5
    })
    .await;
    // Gateway API routes are not implemented: no route kind is claimed or attached.
    let gw = h.gateway("bookinfo", "team-wp").expect("gateway");
    eventually("listener status", 10, || {
        h.gateway("bookinfo", "team-wp")
            .is_some_and(|g| g["status"]["listeners"][0]["name"] == "mesh")
    })
    .await;
    let gw = h.gateway("bookinfo", "team-wp").unwrap_or(gw);
    assert_eq!(gw["status"]["listeners"][0]["supportedKinds"], json!([]));
    assert_eq!(gw["status"]["listeners"][0]["attachedRoutes"], 0);
}

/// What .ci/run validates (`render_waypoint` on deploy/examples/gateway.yaml) is what the
/// controller applies for that Gateway: one template, no copy to drift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_validated_render_is_what_the_controller_applies() {
    use controller::waypoint::{gateway::Gateway, render, WaypointConfig, WaypointParams};
    let h = Harness::start(true, Duration::from_secs(3600)).await;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/gateway.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/examples/gateway.yaml");
    let mut created = h.server.apply_yaml(&text).expect("gateway").remove(0);
    eventually("all five objects", 20, || {
        h.present("bookinfo", "waypoint", "waypoint").len() == 5
    })
    .await;
    // Rendered for the Gateway as the API server holds it (its real uid), with the
    // harness's configuration (as render_waypoint does with the environment's).
    created["status"] = json!(null);
    let gw: Gateway = serde_json::from_value(created).expect("gateway");
    let config = WaypointConfig {
        image: "registry.example/waypoint:test".into(),
        ..WaypointConfig::default()
    };
    let params = WaypointParams::resolve(&gw, &config, None).expect("params");
    let rendered = render(&gw, &params)
        .expect("render")
        .to_values()
        .expect("values");
    assert_eq!(rendered.len(), 5);
    for want in rendered {
        let (api, kind) = (
            want["apiVersion"].as_str().unwrap_or_default(),
            want["kind"].as_str().unwrap_or_default(),
        );
        let name = want["metadata"]["name"].as_str().unwrap_or_default();
        let got = h.get(api, kind, "bookinfo", name).expect("applied");
        for field in ["labels", "annotations", "ownerReferences"] {
            assert_eq!(
                got["metadata"][field], want["metadata"][field],
                "{kind} {field}"
            );
        }
        // The server fills in defaults (clusterIP…); everything we set is there as rendered.
        assert_contains(&got["spec"], &want["spec"], &format!("{kind}.spec"));
    }
}

/// Every field of `want` is in `got` with the same value (`got` may have more).
fn assert_contains(got: &serde_json::Value, want: &serde_json::Value, at: &str) {
    match (got, want) {
        (serde_json::Value::Object(g), serde_json::Value::Object(w)) => {
            for (k, v) in w {
                assert_contains(&g[k], v, &format!("{at}.{k}"));
            }
        }
        (serde_json::Value::Array(g), serde_json::Value::Array(w)) => {
            assert_eq!(g.len(), w.len(), "{at}");
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                assert_contains(g, w, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(got, want, "{at}"),
    }
}
