//! Waypoints enabled the Kubernetes way: a `Gateway` with `gatewayClassName: istio-mesh`, its
//! waypoint pods labelled `gateway.networking.k8s.io/gateway-name: <gateway>`, and services
//! (or their namespace, through a `Namespace` document) labelled
//! `istio.io/use-waypoint: <gateway>`. Such services get their `waypoint` filled in with a
//! waypoint pod's address, exactly as if it had been written in the local form. A binding that
//! cannot be resolved (no such Gateway, or no pod for it) is rejected for that service alone,
//! which then fails closed: it keeps an [`unresolved`] waypoint, so ztunnels refuse its traffic
//! rather than send it around the waypoint where its policies are enforced.

use crate::model::{GatewayAddress, Service, Workload};
use std::collections::{BTreeMap, BTreeSet};

pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
pub const WAYPOINT_CLASS: &str = "istio-mesh";
const WAYPOINT_HBONE_PORT: u16 = 15006;

fn str_at<'v>(v: &'v serde_json::Value, path: &[&str]) -> Option<&'v str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// `(namespace, name)` of every `istio-mesh` Gateway among the kept Kubernetes resources.
pub fn waypoint_gateways(resources: &[serde_json::Value]) -> BTreeSet<(String, String)> {
    resources
        .iter()
        .filter(|r| str_at(r, &["kind"]) == Some("Gateway"))
        .filter(|r| str_at(r, &["spec", "gatewayClassName"]) == Some(WAYPOINT_CLASS))
        .filter_map(|r| {
            let name = str_at(r, &["metadata", "name"])?;
            let ns = str_at(r, &["metadata", "namespace"]).unwrap_or("default");
            Some((ns.to_string(), name.to_string()))
        })
        .collect()
}

/// `use-waypoint` labels of `Namespace` documents.
pub fn namespace_waypoints(resources: &[serde_json::Value]) -> BTreeMap<String, String> {
    resources
        .iter()
        .filter(|r| str_at(r, &["kind"]) == Some("Namespace"))
        .filter_map(|r| {
            let ns = str_at(r, &["metadata", "name"])?;
            let gw = str_at(r, &["metadata", "labels", USE_WAYPOINT_LABEL])?;
            Some((ns.to_string(), gw.to_string()))
        })
        .collect()
}

/// Fills in `service.waypoint` from its (or its namespace's) `use-waypoint` label. An explicit
/// `waypoint` wins. Errors name the missing piece.
pub fn bind(
    service: &mut Service,
    gateways: &BTreeSet<(String, String)>,
    namespaces: &BTreeMap<String, String>,
    workloads: &[&Workload],
) -> Result<(), String> {
    if service.waypoint.is_some() {
        return Ok(());
    }
    let Some(gw) = service
        .labels
        .get(USE_WAYPOINT_LABEL)
        .or_else(|| namespaces.get(&service.namespace))
    else {
        return Ok(());
    };
    if gw == "none" {
        return Ok(());
    }
    if !gateways.contains(&(service.namespace.clone(), gw.clone())) {
        return Err(format!(
            "labels.{USE_WAYPOINT_LABEL}: no Gateway {}/{gw} with gatewayClassName {WAYPOINT_CLASS}",
            service.namespace
        ));
    }
    let pod = workloads
        .iter()
        .filter(|w| w.namespace == service.namespace)
        .filter(|w| w.labels.get(GATEWAY_NAME_LABEL) == Some(gw))
        .filter(|w| !w.workload_ips.is_empty())
        .min_by_key(|w| w.workload_ips[0])
        .ok_or_else(|| {
            format!(
                "labels.{USE_WAYPOINT_LABEL}: Gateway {}/{gw} has no waypoint workload (labelled {GATEWAY_NAME_LABEL}: {gw})",
                service.namespace
            )
        })?;
    service.waypoint = Some(GatewayAddress {
        destination: format!("/{}", pod.workload_ips[0]),
        hbone_mtls_port: WAYPOINT_HBONE_PORT,
        identity: None,
    });
    Ok(())
}

/// The waypoint of a service whose binding failed: an address no proxy can resolve (no IP, no
/// identity), so ztunnels refuse its traffic instead of sending it around the waypoint.
pub fn unresolved() -> GatewayAddress {
    GatewayAddress {
        destination: "unresolved/".to_string(),
        hbone_mtls_port: WAYPOINT_HBONE_PORT,
        identity: None,
    }
}

#[cfg(test)]
mod tests {
    const CONFIG: &str = r#"
workloads:
- {uid: wp, name: productpage-waypoint, namespace: default, serviceAccount: bookinfo-productpage, workloadIps: [10.244.2.9], protocol: HBONE, node: n2, labels: {gateway.networking.k8s.io/gateway-name: productpage}}
- {uid: p, name: productpage-v1, namespace: default, workloadIps: [10.244.2.2], protocol: HBONE, node: n2, services: {"default/productpage.default.svc.cluster.local": {9080: 9080}}}
services:
- {name: productpage, namespace: default, hostname: productpage.default.svc.cluster.local, vips: ["/10.96.0.30"], ports: {9080: 9080}, labels: {istio.io/use-waypoint: productpage}}
- {name: other, namespace: default, hostname: other.default.svc.cluster.local, vips: ["/10.96.0.31"], ports: {80: 80}}
"#;

    fn gateway_doc() -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/scenarios/waypoint-gateway.yaml");
        std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (shared/ must sit beside the checkout)",
                path.display()
            )
        })
    }

    #[test]
    fn use_waypoint_label_binds_the_service_to_the_gateways_pod() {
        let text = format!("{CONFIG}---\n{}", gateway_doc());
        let snap = crate::config::load_str(&text, "t.yaml").unwrap();
        let pp = snap
            .services
            .iter()
            .find(|s| s.name == "productpage")
            .unwrap();
        let wp = pp.waypoint.as_ref().expect("bound to the waypoint");
        assert_eq!(wp.destination, "/10.244.2.9");
        assert_eq!(wp.hbone_mtls_port, 15006);
        assert_eq!(
            wp.identity.as_ref().unwrap().to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        );
        let other = snap.services.iter().find(|s| s.name == "other").unwrap();
        assert!(other.waypoint.is_none());
    }

    #[test]
    fn label_without_gateway_is_a_rejection_naming_it() {
        let snap = crate::config::load_str(CONFIG, "t.yaml").unwrap();
        let err = snap.rejected[0].to_string();
        assert!(err.contains("no Gateway default/productpage"), "{err}");
        // Fail closed: the service keeps a waypoint nobody can reach.
        let pp = snap
            .services
            .iter()
            .find(|s| s.name == "productpage")
            .unwrap();
        assert!(pp.waypoint.as_ref().unwrap().identity.is_none());
    }

    #[test]
    fn namespace_label_applies_to_its_services() {
        let text = format!(
            "{}---\n{}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio.io/use-waypoint: productpage}}}}\n",
            CONFIG.replace(", labels: {istio.io/use-waypoint: productpage}}", "}"),
            gateway_doc()
        );
        let snap = crate::config::load_str(&text, "t.yaml").unwrap();
        assert!(snap.services.iter().all(|s| s.waypoint.is_some()));
    }
}
