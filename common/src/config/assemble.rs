//! Building a [`Snapshot`] from resources received over xDS rather than read from a file: the
//! workloads, services and L4 policies of Istio's WDS (already converted to the model) plus our
//! config resources (Kubernetes objects as JSON: VirtualService, AuthorizationPolicy,
//! PeerAuthentication, Sidecar, Gateway…). The same document loader and cross-document
//! validation as the local file run over them, so the two modes cannot drift.
//!
//! Differences from a file, because a cluster is never perfectly consistent mid-change:
//! two workloads claiming one IP (a finished pod's address reused) keep the healthy one; two
//! services claiming one VIP keep the first by key; a waypoint given as `<namespace>/<hostname>`
//! (Istio's preferred form) is resolved to that service's VIP. A config resource that does not
//! load alone is reported back (for a NACK) and left out; policies compiled from config
//! resources replace WDS policies of the same `<namespace>/<name>` (they carry selectors and
//! the HTTP-rule flag the wire form cannot).

use super::{load_document, Collected, ConfigError, Document, Origin};
use crate::model::{Authorization, HealthStatus, Protocol, Service, Workload};
use crate::snapshot::{parse_network_address, Snapshot};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

/// Source name used in errors for xDS-delivered configuration.
pub const XDS_SOURCE: &str = "xds";

/// Everything one proxy has received, by resource name. Workloads and services are shared
/// with the caller's own store: assembling copies only the few it has to change.
#[derive(Debug, Default, Clone)]
pub struct Parts {
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Arc<Service>>,
    pub authorizations: Vec<Arc<Authorization>>,
    /// (resource name, Kubernetes object as JSON).
    pub documents: Vec<(String, Arc<serde_json::Value>)>,
}

/// Checks one config resource on its own. `Err`: it cannot be read as a resource at all (it
/// must not be applied: it would fail the whole snapshot). `Ok(Some(e))`: it was rejected alone
/// — apply it anyway, because the loader then puts in its place what the file mode would (a
/// security resource becomes a fail-closed stand-in; a route is left out) — and report `e`.
pub fn check_document(value: &serde_json::Value) -> Result<Option<ConfigError>, ConfigError> {
    let mut scratch = Collected::default();
    load_value(1, value, &mut scratch)?;
    Ok(scratch.rejected.into_iter().next())
}

fn load_value(
    index: usize,
    value: &serde_json::Value,
    out: &mut Collected,
) -> Result<(), ConfigError> {
    // JSON is YAML: the document loader reads it unchanged.
    let doc = Document {
        index,
        first_line: 1,
        text: value.to_string(),
    };
    load_document(&doc, XDS_SOURCE, out)
}

fn preference(w: &Workload) -> (bool, bool) {
    (
        w.status == HealthStatus::Healthy,
        w.protocol == Protocol::Hbone,
    )
}

/// Assembles a snapshot. Fails only where a file would fail for reasons a single resource
/// cannot be blamed for; the caller keeps its last good snapshot then.
pub fn assemble(parts: Parts) -> Result<Snapshot, ConfigError> {
    let mut c = Collected::default();
    let origin = |doc: usize, resource: String| Origin {
        doc,
        resource,
        field: String::new(),
    };

    // Config documents first: policies compiled from them shadow WDS policies.
    for (i, (_, value)) in parts.documents.iter().enumerate() {
        load_value(i + 1, value, &mut c)?;
    }
    let shadowed: HashSet<(String, String)> = c
        .policies
        .iter()
        .map(|(p, _, _)| (p.namespace.clone(), p.name.clone()))
        .collect();

    // Workloads: one owner per IP (the healthy, mesh-capable one; then the first uid).
    let mut workloads = parts.workloads;
    workloads.sort_by(|a, b| {
        preference(b)
            .cmp(&preference(a))
            .then_with(|| a.uid.cmp(&b.uid))
    });
    let mut owners: HashMap<IpAddr, usize> = HashMap::with_capacity(workloads.len());
    for i in 0..workloads.len() {
        let w = &workloads[i];
        let mut keep = Vec::with_capacity(w.workload_ips.len());
        for ip in &w.workload_ips {
            match owners.get(&ip.to_canonical()) {
                Some(&o) => {
                    tracing::warn!(ip = %ip, workload = %w.uid, owner = %workloads[o].uid,
                        "address claimed by two workloads; keeping the healthy one");
                    keep.push(false);
                }
                None => {
                    owners.insert(ip.to_canonical(), i);
                    keep.push(true);
                }
            }
        }
        if keep.contains(&false) {
            let mut k = keep.into_iter();
            Arc::make_mut(&mut workloads[i])
                .workload_ips
                .retain(|_| k.next().unwrap_or(false));
        }
    }
    drop(owners);
    for w in workloads {
        let resource = format!("workload {}", w.uid);
        c.workloads.push((w, origin(0, resource), true));
    }

    // Services: unique VIPs; hostname-form waypoints resolved to a VIP.
    let mut services = parts.services;
    services.sort_by_key(|s| s.key());
    let first_vip: HashMap<String, String> = services
        .iter()
        .filter_map(|s| s.vips.first().map(|v| (s.key(), v.clone())))
        .collect();
    let mut vips: HashSet<IpAddr> = HashSet::new();
    for mut s in services {
        let keep: Vec<bool> = s
            .vips
            .iter()
            .map(|v| match parse_network_address(v) {
                Ok((_, ip)) => vips.insert(ip),
                Err(_) => false,
            })
            .collect();
        if keep.contains(&false) {
            let mut k = keep.into_iter();
            Arc::make_mut(&mut s)
                .vips
                .retain(|_| k.next().unwrap_or(false));
        }
        let resource = format!("service {}", s.key());
        c.services.push((s, origin(0, resource)));
    }
    // A hostname-form waypoint (`<namespace>/<hostname>`) becomes that service's VIP.
    let resolved = |gw: &Option<crate::model::GatewayAddress>| -> Option<String> {
        let g = gw.as_ref()?;
        if parse_network_address(&g.destination).is_ok() {
            return None;
        }
        first_vip.get(&g.destination).cloned()
    };
    for (w, _, _) in &mut c.workloads {
        if let Some(vip) = resolved(&w.waypoint) {
            if let Some(g) = Arc::make_mut(w).waypoint.as_mut() {
                g.destination = vip;
            }
        }
    }
    for (s, _) in &mut c.services {
        if let Some(vip) = resolved(&s.waypoint) {
            if let Some(g) = Arc::make_mut(s).waypoint.as_mut() {
                g.destination = vip;
            }
        }
    }

    for p in parts.authorizations {
        if shadowed.contains(&(p.namespace.clone(), p.name.clone())) {
            continue;
        }
        let resource = format!("authorization {}/{}", p.namespace, p.name);
        c.policies
            .push((Authorization::clone(&p), origin(0, resource), false));
    }
    super::validate::finish(c, XDS_SOURCE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GatewayAddress;

    fn workload(uid: &str, ip: &str, status: HealthStatus) -> Workload {
        serde_json::from_value(serde_json::json!({
            "uid": uid, "name": uid, "namespace": "default",
            "workloadIps": [ip], "protocol": "HBONE", "node": "n1",
            "status": match status { HealthStatus::Healthy => "Healthy", HealthStatus::Unhealthy => "Unhealthy" },
        }))
        .expect("workload")
    }

    #[test]
    fn workloads_are_shared_with_the_caller_and_only_changed_ones_copied() {
        let (wp, wp_svc) = waypoint_behind_vip();
        let plain = Arc::new(workload("plain", "10.0.0.2", HealthStatus::Healthy));
        let mut bound = workload("bound", "10.0.0.3", HealthStatus::Healthy);
        bound.waypoint = Some(GatewayAddress {
            destination: "/10.96.0.9".into(),
            hbone_mtls_port: 15006,
            identity: None,
        });
        let bound = Arc::new(bound);
        // Loses its second address to `plain`, which is healthy.
        let mut stale = workload("stale", "10.0.0.4", HealthStatus::Unhealthy);
        stale.workload_ips.push("10.0.0.2".parse().expect("ip"));
        let stale = Arc::new(stale);
        let parts = Parts {
            workloads: vec![Arc::new(wp), plain.clone(), bound.clone(), stale.clone()],
            services: vec![Arc::new(wp_svc)],
            ..Default::default()
        };
        let snap = assemble(parts).expect("assembles");
        let get = |uid: &str| {
            snap.workloads
                .iter()
                .find(|w| w.uid == uid)
                .expect(uid)
                .clone()
        };
        assert!(Arc::ptr_eq(&get("plain"), &plain), "unchanged: shared");
        // The waypoint's identity is resolved on a copy; the caller's stays as received.
        let resolved = get("bound");
        assert!(!Arc::ptr_eq(&resolved, &bound));
        assert!(resolved
            .waypoint
            .as_ref()
            .expect("bound")
            .identity
            .is_some());
        assert!(bound.waypoint.as_ref().expect("bound").identity.is_none());
        let trimmed = get("stale");
        assert_eq!(
            trimmed.workload_ips,
            vec!["10.0.0.4".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(
            stale.workload_ips.len(),
            2,
            "the caller's copy is untouched"
        );
    }

    #[test]
    fn a_reused_address_goes_to_the_healthy_workload() {
        let parts = Parts {
            workloads: vec![
                Arc::new(workload("a-old", "10.0.0.1", HealthStatus::Unhealthy)),
                Arc::new(workload("b-new", "10.0.0.1", HealthStatus::Healthy)),
            ],
            ..Default::default()
        };
        let snap = assemble(parts).expect("assembles");
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        assert_eq!(
            snap.workload_by_ip(ip).map(|w| w.uid.as_str()),
            Some("b-new")
        );
    }

    /// A waypoint pod (10.0.0.9) behind its Service's VIP 10.96.0.9.
    fn waypoint_behind_vip() -> (Workload, Service) {
        let mut wp = workload("wp", "10.0.0.9", HealthStatus::Healthy);
        wp.services.insert(
            "default/wp.default.svc.cluster.local".into(),
            [(15006, 15006)].into(),
        );
        let wp_svc: Service = serde_json::from_value(serde_json::json!({
            "name": "wp", "namespace": "default", "hostname": "wp.default.svc.cluster.local",
            "vips": ["/10.96.0.9"], "ports": {"15006": 15006},
        }))
        .expect("service");
        (wp, wp_svc)
    }

    #[test]
    fn hostname_waypoints_resolve_to_the_service_vip() {
        let (wp, wp_svc) = waypoint_behind_vip();
        let mut app: Service = serde_json::from_value(serde_json::json!({
            "name": "app", "namespace": "default", "hostname": "app.default.svc.cluster.local",
            "vips": ["/10.96.0.1"], "ports": {"80": 8080},
        }))
        .expect("service");
        app.waypoint = Some(GatewayAddress {
            destination: "default/wp.default.svc.cluster.local".into(),
            hbone_mtls_port: 15006,
            identity: None,
        });
        let snap = assemble(Parts {
            workloads: vec![Arc::new(wp)],
            services: vec![Arc::new(wp_svc), Arc::new(app)],
            ..Default::default()
        })
        .expect("assembles");
        let app = snap
            .services
            .iter()
            .find(|s| s.name == "app")
            .expect("app service");
        let gw = app.waypoint.as_ref().expect("waypoint");
        assert_eq!(gw.destination, "/10.96.0.9");
        assert_eq!(
            gw.identity.as_ref().map(|i| i.to_string()).as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/default")
        );
    }

    /// A ServiceEntry from the feed binds to the waypoint the controller named in its
    /// annotation (labels are the controller's to judge: one naming a Gateway the proxy cannot
    /// see does not bind, and does not fail closed either).
    #[test]
    fn feed_entries_bind_to_the_waypoint_the_controller_named() {
        let (wp, wp_svc) = waypoint_behind_vip();
        let entry = |name: &str, host: &str, annotations: serde_json::Value| {
            serde_json::json!({
                "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": name, "namespace": "default", "annotations": annotations,
                             "labels": {"istio.io/use-waypoint": "elsewhere"}},
                "spec": {"hosts": [host], "resolution": "DNS",
                         "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}]}
            })
        };
        let bound = entry(
            "bound",
            "api.example.com",
            serde_json::json!({crate::config::waypoints::BOUND_WAYPOINT_ANNOTATION:
                "{\"destination\": \"/10.96.0.9\", \"hboneMtlsPort\": 15006}"}),
        );
        let unbound = entry("unbound", "other.example.com", serde_json::json!({}));
        let snap = assemble(Parts {
            workloads: vec![Arc::new(wp)],
            services: vec![Arc::new(wp_svc)],
            documents: vec![
                ("a".into(), Arc::new(bound)),
                ("b".into(), Arc::new(unbound)),
            ],
            ..Default::default()
        })
        .expect("assembles");
        assert!(snap.rejected.is_empty(), "{:?}", snap.rejected);
        let host = |h: &str| snap.services.iter().find(|s| s.hostname == h).expect(h);
        let gw = host("api.example.com").waypoint.as_ref().expect("bound");
        assert_eq!(gw.destination, "/10.96.0.9");
        assert_eq!(
            gw.identity.as_ref().map(|i| i.to_string()).as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/default")
        );
        assert!(host("other.example.com").waypoint.is_none());
    }

    #[test]
    fn config_policies_shadow_wire_policies_of_the_same_name() {
        let wire: Authorization = serde_json::from_value(serde_json::json!({
            "name": "deny", "namespace": "default", "scope": "Namespace", "action": "Allow",
        }))
        .expect("policy");
        let doc = serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny", "namespace": "default"},
            "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]},
        });
        let snap = assemble(Parts {
            authorizations: vec![Arc::new(wire)],
            documents: vec![("AuthorizationPolicy/default/deny".into(), Arc::new(doc))],
            ..Default::default()
        })
        .expect("assembles");
        assert_eq!(snap.authorizations.len(), 1);
        assert!(
            snap.authorizations[0].has_l7_rules,
            "the compiled document wins"
        );
    }

    #[test]
    fn a_bad_document_is_refused_alone() {
        let bad = serde_json::json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "v", "namespace": "default"},
            "spec": {"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a", "port": {"number": 99999}}}]}]},
        });
        assert!(
            matches!(check_document(&bad), Ok(Some(_))),
            "rejected alone, reported"
        );
        let good = serde_json::json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "v", "namespace": "default"},
            "spec": {"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}}]}]},
        });
        assert!(matches!(check_document(&good), Ok(None)));
        let unreadable = serde_json::json!({"kind": "VirtualService"});
        assert!(
            check_document(&unreadable).is_err(),
            "no apiVersion: not a resource"
        );
    }
}
