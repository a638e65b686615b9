//! Waypoints enabled the Kubernetes way: a `Gateway` with `gatewayClassName: istio-waypoint`
//! (or the early `istio-mesh`), its
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
/// On a ServiceEntry the control plane sends: the waypoint it bound the entry to, as a
/// [`GatewayAddress`] in JSON (`{"destination": "/<VIP>", "hboneMtlsPort": 15008}`). The
/// controller decides bindings (labels, namespaces, Gateways and their classes are in the
/// cluster, not in the feed), sets this on bound entries and strips it from the others; it is
/// only read from the control plane's feed, never from a local file.
pub const BOUND_WAYPOINT_ANNOTATION: &str = "ambient-controller/waypoint";
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The early waypoint class of the seed's YAML.
pub const WAYPOINT_CLASS: &str = "istio-mesh";
/// Istio's waypoint class.
pub const ISTIO_WAYPOINT_CLASS: &str = "istio-waypoint";
const WAYPOINT_HBONE_PORT: u16 = 15006;

fn str_at<'v>(v: &'v serde_json::Value, path: &[&str]) -> Option<&'v str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// `(namespace, name)` of every waypoint Gateway (`istio-waypoint` or `istio-mesh`) among the
/// kept Kubernetes resources.
pub fn waypoint_gateways(resources: &[serde_json::Value]) -> BTreeSet<(String, String)> {
    resources
        .iter()
        .filter(|r| str_at(r, &["kind"]) == Some("Gateway"))
        .filter(|r| {
            matches!(
                str_at(r, &["spec", "gatewayClassName"]),
                Some(WAYPOINT_CLASS | ISTIO_WAYPOINT_CLASS)
            )
        })
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
            "labels.{USE_WAYPOINT_LABEL}: no Gateway {}/{gw} with gatewayClassName {ISTIO_WAYPOINT_CLASS} or {WAYPOINT_CLASS}",
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

    const ENTRIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default, labels: {istio.io/use-waypoint: productpage}}
spec: {hosts: [api.example.com], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: plain, namespace: default}
spec: {hosts: [db.example.com], ports: [{number: 5432, name: tcp}], resolution: STATIC, endpoints: [{address: 192.0.2.7}]}
"#;

    fn entry<'s>(snap: &'s crate::snapshot::Snapshot, host: &str) -> &'s crate::model::Service {
        snap.services
            .iter()
            .find(|s| s.hostname == host)
            .unwrap_or_else(|| panic!("no service for {host}"))
    }

    /// A ServiceEntry's own `use-waypoint` label binds its hosts; an `istio-waypoint` Gateway
    /// counts as well as the early `istio-mesh` one.
    #[test]
    fn service_entry_label_binds_its_hosts_to_the_waypoint() {
        let gateway = gateway_doc().replace("istio-mesh", "istio-waypoint");
        assert!(gateway.contains("istio-waypoint"));
        let text = format!("{CONFIG}---\n{gateway}---\n{ENTRIES}");
        let snap = crate::config::load_str(&text, "t.yaml").unwrap();
        assert!(snap.rejected.is_empty(), "{:?}", snap.rejected);
        let wp = entry(&snap, "api.example.com").waypoint.as_ref();
        let wp = wp.expect("the labelled entry is bound");
        assert_eq!(wp.destination, "/10.244.2.9");
        assert!(wp.identity.is_some());
        assert!(entry(&snap, "db.example.com").waypoint.is_none());
    }

    /// The namespace's label binds every entry of the namespace; an entry naming a Gateway that
    /// does not exist is rejected alone and fails closed.
    #[test]
    fn namespace_label_binds_entries_and_a_missing_gateway_fails_closed() {
        let text = format!(
            "{CONFIG}---\n{}---\n{ENTRIES}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio.io/use-waypoint: productpage}}}}\n",
            gateway_doc()
        );
        let snap = crate::config::load_str(&text, "t.yaml").unwrap();
        let db = entry(&snap, "db.example.com").waypoint.as_ref();
        assert_eq!(
            db.expect("bound through the namespace").destination,
            "/10.244.2.9"
        );

        let text = format!(
            "{CONFIG}---\n{}---\n{}",
            gateway_doc(),
            ENTRIES.replace("use-waypoint: productpage", "use-waypoint: egress")
        );
        let snap = crate::config::load_str(&text, "t.yaml").unwrap();
        let errs: Vec<String> = snap.rejected.iter().map(|e| e.to_string()).collect();
        assert!(
            errs.iter().any(|e| e.contains("ServiceEntry default/ext")
                && e.contains("no Gateway default/egress")),
            "{errs:?}"
        );
        let wp = entry(&snap, "api.example.com").waypoint.as_ref();
        assert!(wp.expect("fail closed").identity.is_none());
    }
}
