//! The synthetic cluster of the control-plane benchmark ([`crate::control_plane`]): a [`Scale`]
//! (pods, services, policies) turned into the Kubernetes objects a real cluster of that size
//! holds, in the shapes an API server returns (as `../shared/k8s-fixtures/`): ambient
//! namespaces, nodes, ready pods spread over the nodes (labels, service account, IPs, owner
//! references), Services with selectors and their EndpointSlices, AuthorizationPolicies (L4
//! selector, namespace-wide, DENY, and L7 rules attached to a Service), a few VirtualServices
//! and DestinationRules, and one host-network ztunnel pod per probed node.

use serde_json::{json, Value};
use std::net::Ipv4Addr;

/// The size of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    pub name: &'static str,
    pub pods: usize,
    pub services: usize,
    pub policies: usize,
}

impl Scale {
    /// Nodes the pods are spread over: one per 100 pods, and at least enough for the probed
    /// ztunnels.
    pub fn nodes(&self) -> usize {
        (self.pods / 100).max(NODE_AGENTS)
    }

    /// Ambient namespaces: one per 50 services, at least one.
    pub fn namespaces(&self) -> usize {
        (self.services / 50).max(1)
    }

    /// VirtualServices and DestinationRules (each): one per 100 services, at least one when
    /// there are services.
    pub fn routes(&self) -> usize {
        if self.services == 0 {
            0
        } else {
            (self.services / 100).max(1)
        }
    }
}

/// Nodes with a ztunnel pod (and token): the 10 xDS probes use `n0`..`n9`, the real ztunnel
/// `n10`.
pub const NODE_AGENTS: usize = 11;

pub fn node_name(i: usize) -> String {
    format!("n{i}")
}

pub fn namespace_name(i: usize) -> String {
    format!("bench-{i}")
}

/// The ztunnel pod of node `i` (namespace [`::tests::cluster::SYSTEM_NS`], account `ztunnel`).
pub fn ztunnel_pod_name(i: usize) -> String {
    format!("ztunnel-{}", node_name(i))
}

fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + i as u32)
}

/// Pod IPs come from 10.244.0.0/16 (index 0 → 10.244.0.10); churn pods from 10.250.0.0/16.
fn pod_ip(base: [u8; 2], i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(base[0], base[1], 0, 10)) + i as u32)
}

fn service_ip(j: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + j as u32)
}

/// The service pod `i` belongs to (pods are dealt round-robin), and its namespace.
fn service_of(s: &Scale, i: usize) -> Option<usize> {
    (s.services > 0).then(|| i % s.services)
}

fn service_namespace(s: &Scale, j: usize) -> String {
    namespace_name(j % s.namespaces())
}

fn service_name(j: usize) -> String {
    format!("svc-{j}")
}

/// A running, ready Pod as the kubelet reports it, owned by a ReplicaSet.
#[allow(clippy::too_many_arguments)]
pub fn pod(
    ns: &str,
    name: &str,
    app: &str,
    version: &str,
    sa: &str,
    node: usize,
    ip: Ipv4Addr,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
            "labels": {"app": app, "version": version, "pod-template-hash": "7c9d8f6b5"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": format!("{app}-{version}-7c9d8f6b5"),
                                 "uid": format!("rs-{ns}-{app}-{version}"),
                                 "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {"nodeName": node_name(node), "serviceAccountName": sa,
                 "containers": [{"name": app, "image": format!("{app}:{version}"),
                                 "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "hostIP": node_ip(node).to_string(),
                   "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
                   "conditions": [{"type": "Ready", "status": "True"},
                                  {"type": "ContainersReady", "status": "True"}]}
    })
}

/// Pod `i` of the scale.
fn scale_pod(s: &Scale, i: usize) -> Value {
    let (ns, app) = match service_of(s, i) {
        Some(j) => (service_namespace(s, j), service_name(j)),
        None => (namespace_name(0), "standalone".to_string()),
    };
    let version = if i.is_multiple_of(3) { "v2" } else { "v1" };
    pod(
        &ns,
        &format!("{app}-{version}-7c9d8f6b5-{i}"),
        &app,
        version,
        &app,
        i % s.nodes(),
        pod_ip([10, 244], i),
    )
}

/// A pod created and deleted by the change test: in the first namespace, a member of the
/// first service (so the service's endpoints change too), on node `n5`.
pub fn churn_pod(s: &Scale, k: usize) -> (String, String, Value) {
    let ns = namespace_name(0);
    let name = format!("churn-{k}");
    let app = if s.services > 0 {
        service_name(0)
    } else {
        "standalone".to_string()
    };
    let p = pod(&ns, &name, &app, "v1", &app, 5, pod_ip([10, 250], k));
    (ns, name, p)
}

fn service(s: &Scale, j: usize) -> Value {
    let ip = service_ip(j).to_string();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": service_name(j), "namespace": service_namespace(s, j),
                     "uid": format!("svc-uid-{j}"), "labels": {"app": service_name(j)}},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "selector": {"app": service_name(j)},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                           {"name": "grpc", "port": 9090, "targetPort": 9090, "protocol": "TCP"}]}
    })
}

/// The EndpointSlice of service `j`: every pod dealt to it, ready.
fn endpoint_slice(s: &Scale, j: usize) -> Value {
    let ns = service_namespace(s, j);
    let eps: Vec<Value> = (j..s.pods)
        .step_by(s.services)
        .map(|i| {
            let p = scale_pod(s, i);
            let name = p["metadata"]["name"].clone();
            json!({"addresses": [p["status"]["podIP"]],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": p["spec"]["nodeName"],
                   "targetRef": {"kind": "Pod", "namespace": ns, "name": name,
                                 "uid": p["metadata"]["uid"]}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{}-abcde", service_name(j)), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service_name(j),
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service",
                                          "name": service_name(j), "uid": format!("svc-uid-{j}"),
                                          "controller": true, "blockOwnerDeletion": true}]},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "grpc", "port": 9090, "protocol": "TCP"}]
    })
}

/// Policy `k`: a rotation of L4 ALLOW by workload selector and peer principal, namespace-wide
/// ALLOW from other namespaces, L4 DENY by IP block, and L7 rules (methods, paths) attached to
/// a Service (what a waypoint enforces).
fn policy(s: &Scale, k: usize) -> Value {
    let j = if s.services > 0 { k % s.services } else { 0 };
    let ns = if s.services > 0 {
        service_namespace(s, j)
    } else {
        namespace_name(0)
    };
    let peer = service_name((j + 1) % s.services.max(1));
    let peer_ns = namespace_name((k + 1) % s.namespaces());
    let td = "cluster.local";
    let spec = match k % 4 {
        0 => json!({
            "selector": {"matchLabels": {"app": service_name(j)}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [format!("{td}/ns/{peer_ns}/sa/{peer}")]}}],
                       "to": [{"operation": {"ports": ["8080", "9090"]}}]}]
        }),
        1 => json!({
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"namespaces": [peer_ns, ns.clone()]}}]}]
        }),
        2 => json!({
            "selector": {"matchLabels": {"app": service_name(j), "version": "v2"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"ipBlocks": ["192.168.0.0/16"],
                                            "notPrincipals": [format!("{td}/ns/{ns}/sa/{peer}")]}}]}]
        }),
        _ => json!({
            "targetRefs": [{"kind": "Service", "group": "", "name": service_name(j)}],
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [format!("{td}/ns/{peer_ns}/sa/{peer}")]}}],
                       "to": [{"operation": {"methods": ["GET", "HEAD"], "paths": ["/api/*", "/healthz"]}}],
                       "when": [{"key": "request.headers[x-tenant]", "values": ["t1", "t2"]}]}]
        }),
    };
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": format!("policy-{k}"), "namespace": ns},
        "spec": spec
    })
}

fn virtual_service(s: &Scale, r: usize) -> Value {
    let j = r % s.services.max(1);
    let host = service_name(j);
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": format!("{host}-routes"), "namespace": service_namespace(s, j)},
        "spec": {"hosts": [host],
                 "http": [{"match": [{"uri": {"prefix": "/v2"}}],
                           "route": [{"destination": {"host": host, "subset": "v2"}}],
                           "timeout": "2s"},
                          {"route": [{"destination": {"host": host, "subset": "v1"}, "weight": 90},
                                     {"destination": {"host": host, "subset": "v2"}, "weight": 10}],
                           "retries": {"attempts": 2, "perTryTimeout": "500ms"}}]}
    })
}

fn destination_rule(s: &Scale, r: usize) -> Value {
    let j = r % s.services.max(1);
    let host = service_name(j);
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": format!("{host}-subsets"), "namespace": service_namespace(s, j)},
        "spec": {"host": host,
                 "trafficPolicy": {"connectionPool": {"http": {"http1MaxPendingRequests": 100}},
                                   "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s"}},
                 "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                             {"name": "v2", "labels": {"version": "v2"}}]}
    })
}

/// Every object of the scale, namespaces and nodes first (the order a cluster would have
/// created them in; the API server does not care).
pub fn objects(s: &Scale) -> Vec<Value> {
    let mut out = Vec::with_capacity(s.pods + 2 * s.services + s.policies + 200);
    out.push(::tests::cluster::namespace(
        ::tests::cluster::SYSTEM_NS,
        false,
    ));
    for n in 0..s.namespaces() {
        out.push(::tests::cluster::namespace(&namespace_name(n), true));
    }
    for n in 0..s.nodes() {
        out.push(json!({"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": node_name(n), "labels": {"kubernetes.io/hostname": node_name(n)}},
                        "status": {"addresses": [{"type": "InternalIP", "address": node_ip(n).to_string()}]}}));
    }
    for n in 0..NODE_AGENTS {
        let zt = ztunnel_pod_name(n);
        let mut p = ::tests::cluster::pod(
            ::tests::cluster::SYSTEM_NS,
            &zt,
            "ztunnel",
            &node_name(n),
            &node_ip(n).to_string(),
            &[("app", "ztunnel")],
        );
        p["spec"]["hostNetwork"] = json!(true);
        out.push(p);
    }
    out.extend((0..s.pods).map(|i| scale_pod(s, i)));
    for j in 0..s.services {
        out.push(service(s, j));
        out.push(endpoint_slice(s, j));
    }
    out.extend((0..s.policies).map(|k| policy(s, k)));
    for r in 0..s.routes() {
        out.push(virtual_service(s, r));
        out.push(destination_rule(s, r));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const TENTH: Scale = Scale {
        name: "tenth",
        pods: 1000,
        services: 100,
        policies: 50,
    };

    fn kinds(objs: &[Value], kind: &str) -> Vec<Value> {
        objs.iter().filter(|o| o["kind"] == kind).cloned().collect()
    }

    #[test]
    fn a_scale_yields_its_counts_with_unique_names_and_ips() {
        let objs = objects(&TENTH);
        let pods = kinds(&objs, "Pod");
        assert_eq!(pods.len(), 1000 + NODE_AGENTS);
        assert_eq!(kinds(&objs, "Service").len(), 100);
        assert_eq!(kinds(&objs, "EndpointSlice").len(), 100);
        assert_eq!(kinds(&objs, "AuthorizationPolicy").len(), 50);
        assert_eq!(kinds(&objs, "VirtualService").len(), 1);
        assert_eq!(kinds(&objs, "Node").len(), 11);
        let keys: HashSet<String> = pods
            .iter()
            .map(|p| format!("{}/{}", p["metadata"]["namespace"], p["metadata"]["name"]))
            .collect();
        assert_eq!(keys.len(), pods.len());
        let ips: HashSet<String> = pods
            .iter()
            .map(|p| p["status"]["podIP"].to_string())
            .collect();
        assert_eq!(ips.len(), pods.len());
    }

    #[test]
    fn every_pod_is_an_endpoint_of_the_service_that_selects_it() {
        let objs = objects(&TENTH);
        let slices = kinds(&objs, "EndpointSlice");
        let total: usize = slices
            .iter()
            .map(|s| s["endpoints"].as_array().map_or(0, Vec::len))
            .sum();
        assert_eq!(total, 1000);
        let svc = &kinds(&objs, "Service")[7];
        let selected = svc["spec"]["selector"]["app"].clone();
        let slice = &slices[7];
        for ep in slice["endpoints"].as_array().unwrap() {
            let name = ep["targetRef"]["name"].as_str().unwrap();
            let pod = objs
                .iter()
                .find(|o| o["kind"] == "Pod" && o["metadata"]["name"] == name)
                .unwrap();
            assert_eq!(pod["metadata"]["labels"]["app"], selected);
            assert_eq!(pod["metadata"]["namespace"], svc["metadata"]["namespace"]);
            assert_eq!(ep["addresses"][0], pod["status"]["podIP"]);
        }
    }

    #[test]
    fn policies_mix_l4_namespace_deny_and_l7() {
        let objs = objects(&TENTH);
        let pols = kinds(&objs, "AuthorizationPolicy");
        assert!(pols.iter().any(|p| p["spec"]["action"] == "DENY"));
        assert!(pols
            .iter()
            .any(|p| p["spec"]["selector"].is_null() && p["spec"]["targetRefs"].is_null()));
        assert!(pols
            .iter()
            .any(|p| !p["spec"]["rules"][0]["to"][0]["operation"]["paths"].is_null()));
    }

    #[test]
    fn churn_pods_do_not_collide_with_scale_pods() {
        let objs = objects(&TENTH);
        let (_, _, p) = churn_pod(&TENTH, 3);
        let ip = &p["status"]["podIP"];
        assert!(!objs.iter().any(|o| o["kind"] == "Pod"
            && (o["status"]["podIP"] == *ip || o["metadata"]["name"] == p["metadata"]["name"])));
    }
}
