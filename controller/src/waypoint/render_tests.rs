//! Field-by-field expectations of the rendered waypoint objects.

use super::gateway::{Gateway, GATEWAY_NAME_LABEL, MANAGED_LABEL, MANAGED_VALUE};
use super::params::{
    WaypointConfig, WaypointParams, AUTOSCALING_ENABLED, MIN_REPLICAS, PDB_ENABLED,
};
use super::render::render;
use serde_json::{json, Value};

fn gateway(class: &str, annotations: Value) -> Gateway {
    serde_json::from_value(json!({
        "metadata": {"name": "reviews-wp", "namespace": "bookinfo", "uid": "uid-1",
                     "generation": 1, "annotations": annotations,
                     "labels": {"istio.io/waypoint-for": "service"}},
        "spec": {"gatewayClassName": class,
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }))
    .expect("gateway")
}

fn config() -> WaypointConfig {
    WaypointConfig {
        image: "registry.example/waypoint:1.2".into(),
        xds_address: "https://ctl.ambient-system.svc:15012".into(),
        ca_address: "https://ctl.ambient-system.svc:15012".into(),
        ..WaypointConfig::default()
    }
}

fn values(gw: &Gateway) -> Vec<Value> {
    let params = WaypointParams::resolve(gw, &config(), None).expect("params");
    render(gw, &params)
        .expect("render")
        .to_values()
        .expect("json")
}

fn by_kind<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or(&Value::Null)
}

#[test]
fn every_object_is_owned_labelled_and_named() {
    let objs = values(&gateway("istio-waypoint", json!({})));
    let kinds: Vec<&str> = objs.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget"
        ]
    );
    let api_versions: Vec<&str> = objs
        .iter()
        .filter_map(|o| o["apiVersion"].as_str())
        .collect();
    assert_eq!(
        api_versions,
        ["v1", "apps/v1", "v1", "autoscaling/v2", "policy/v1"]
    );
    for o in &objs {
        let m = &o["metadata"];
        assert_eq!(m["name"], "reviews-wp", "{}", o["kind"]);
        assert_eq!(m["namespace"], "bookinfo");
        assert_eq!(m["labels"][MANAGED_LABEL], MANAGED_VALUE);
        assert_eq!(m["labels"][GATEWAY_NAME_LABEL], "reviews-wp");
        assert_eq!(m["labels"]["istio.io/gateway-name"], "reviews-wp");
        assert_eq!(
            m["labels"]["gateway.networking.k8s.io/gateway-class-name"],
            "istio-waypoint"
        );
        assert_eq!(
            m["ownerReferences"],
            json!([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                    "name": "reviews-wp", "uid": "uid-1", "controller": true,
                    "blockOwnerDeletion": true}])
        );
    }
}

#[test]
fn deployment_runs_the_waypoint_in_cluster_mode_hardened() {
    let objs = values(&gateway("istio-waypoint", json!({})));
    let d = by_kind(&objs, "Deployment");
    let spec = &d["spec"];
    assert!(spec.get("replicas").is_none(), "the HPA owns replicas");
    assert_eq!(
        spec["selector"],
        json!({"matchLabels": {GATEWAY_NAME_LABEL: "reviews-wp"}})
    );
    let tmpl = &spec["template"];
    let labels = &tmpl["metadata"]["labels"];
    assert_eq!(labels[GATEWAY_NAME_LABEL], "reviews-wp");
    assert_eq!(labels["istio.io/dataplane-mode"], "none");
    assert_eq!(labels["sidecar.istio.io/inject"], "false");
    let ann = &tmpl["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "15020");
    let pod = &tmpl["spec"];
    // HBONE on 15008 (where Istio's ztunnel dials a waypoint pod) and 15006.
    let ports: Vec<i64> = pod["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["containerPort"].as_i64())
        .collect();
    assert!(
        ports.contains(&15008) && ports.contains(&15006),
        "{ports:?}"
    );
    assert_eq!(pod["serviceAccountName"], "reviews-wp");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.example/waypoint:1.2");
    assert_eq!(
        c["args"],
        json!([
            "run",
            "--xds-address",
            "https://ctl.ambient-system.svc:15012",
            "--xds-root-ca",
            "/var/run/secrets/istio/root-cert.pem",
            "--ca-address",
            "https://ctl.ambient-system.svc:15012",
            "--ca-root",
            "/var/run/secrets/istio/root-cert.pem",
            "--token-file",
            "/var/run/secrets/tokens/istio-token",
            "--workload",
            "$(POD_NAMESPACE)/$(POD_NAME)",
            "--node",
            "$(NODE_NAME)"
        ])
    );
    let env = c["env"].as_array().cloned().unwrap_or_default();
    let field = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(field("POD_NAME"), "metadata.name");
    assert_eq!(field("POD_NAMESPACE"), "metadata.namespace");
    assert_eq!(field("NODE_NAME"), "spec.nodeName");
    assert_eq!(field("INSTANCE_IP"), "status.podIP");
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/healthz/ready", "port": 15021, "scheme": "HTTP"})
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        c["resources"]["requests"],
        json!({"cpu": "100m", "memory": "128Mi"})
    );
    let vols = pod["volumes"].as_array().cloned().unwrap_or_default();
    let token = vols
        .iter()
        .find(|v| v["name"] == "istio-token")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"],
        json!({"audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"})
    );
    let root = vols
        .iter()
        .find(|v| v["name"] == "mesh-root")
        .cloned()
        .unwrap_or_default();
    assert_eq!(root["configMap"]["name"], "istio-ca-root-cert");
    let mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
    assert!(mounts
        .iter()
        .any(|m| m["name"] == "istio-token" && m["mountPath"] == "/var/run/secrets/tokens"));
    assert!(mounts
        .iter()
        .any(|m| m["name"] == "mesh-root" && m["mountPath"] == "/var/run/secrets/istio"));
}

#[test]
fn service_hpa_and_pdb() {
    let objs = values(&gateway("istio-waypoint", json!({})));
    let s = &by_kind(&objs, "Service")["spec"];
    assert_eq!(s["type"], "ClusterIP");
    assert_eq!(s["selector"], json!({GATEWAY_NAME_LABEL: "reviews-wp"}));
    assert_eq!(
        s["ports"],
        json!([
            {"name": "status-port", "port": 15021, "targetPort": 15021, "protocol": "TCP", "appProtocol": "tcp"},
            {"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP", "appProtocol": "hbone"},
            {"name": "hbone", "port": 15006, "targetPort": 15006, "protocol": "TCP", "appProtocol": "hbone"},
        ])
    );
    let h = &by_kind(&objs, "HorizontalPodAutoscaler")["spec"];
    assert_eq!(
        h["scaleTargetRef"],
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "reviews-wp"})
    );
    assert_eq!(
        (h["minReplicas"].clone(), h["maxReplicas"].clone()),
        (json!(2), json!(10))
    );
    assert_eq!(
        h["metrics"],
        json!([{"type": "Resource", "resource": {"name": "cpu",
               "target": {"type": "Utilization", "averageUtilization": 80}}}])
    );
    let p = &by_kind(&objs, "PodDisruptionBudget")["spec"];
    assert_eq!(p["maxUnavailable"], 1);
    assert_eq!(
        p["selector"],
        json!({"matchLabels": {GATEWAY_NAME_LABEL: "reviews-wp"}})
    );
}

#[test]
fn hpa_and_pdb_can_be_turned_off_and_tuned() {
    let objs = values(&gateway(
        "istio-waypoint",
        json!({AUTOSCALING_ENABLED: "false", PDB_ENABLED: "false"}),
    ));
    let kinds: Vec<&str> = objs.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(kinds, ["ServiceAccount", "Deployment", "Service"]);
    let objs = values(&gateway("istio-waypoint", json!({MIN_REPLICAS: "3"})));
    assert_eq!(
        by_kind(&objs, "HorizontalPodAutoscaler")["spec"]["minReplicas"],
        3
    );
}

#[test]
fn early_form_names_and_runs_as_the_served_account() {
    let mut gw = gateway(
        "istio-mesh",
        json!({"istio.io/service-account": "bookinfo-reviews"}),
    );
    gw.spec.listeners.clear();
    let params = WaypointParams::resolve(&gw, &config(), None).expect("params");
    let r = render(&gw, &params).expect("render");
    assert!(r.service_account_is_users);
    assert_eq!(
        r.service_account.metadata.name.as_deref(),
        Some("bookinfo-reviews")
    );
    assert_eq!(
        r.deployment.metadata.name.as_deref(),
        Some("reviews-wp-waypoint")
    );
    assert_eq!(
        r.service.metadata.name.as_deref(),
        Some("reviews-wp-waypoint")
    );
    let pod = r
        .deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.service_account_name.clone());
    assert_eq!(pod.as_deref(), Some("bookinfo-reviews"));
}

#[test]
fn a_gateway_without_uid_cannot_own_objects() {
    let mut gw = gateway("istio-waypoint", json!({}));
    gw.metadata.uid = None;
    let params = WaypointParams::resolve(&gw, &config(), None).expect("params");
    assert!(render(&gw, &params).is_err());
}

#[test]
fn the_deploy_example_gateway_renders() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/gateway.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/examples/gateway.yaml");
    let gw: Gateway = serde_yaml_ng::from_str(&text).expect("a Gateway");
    let objs = values(&gw);
    assert_eq!(objs.len(), 5);
    let h = by_kind(&objs, "HorizontalPodAutoscaler");
    assert_eq!(
        (
            h["spec"]["minReplicas"].clone(),
            h["spec"]["maxReplicas"].clone()
        ),
        (json!(2), json!(5))
    );
    assert!(objs
        .iter()
        .all(|o| o["metadata"]["namespace"] == "bookinfo"));
}
