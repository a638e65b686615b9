//! ServiceEntries (and headless Services with Endpoints) loaded from a file become registry
//! services: VIPs (explicit, CIDR, automatic), endpoints, selection, visibility, rejection.

use crate::config::load_str;
use crate::l7::service_entry::Resolution;
use crate::snapshot::Snapshot;
use std::net::IpAddr;

const MESH: &str = r#"
workloads:
- {uid: a, name: a, namespace: default, workloadIps: [10.244.1.2], protocol: HBONE, node: n1}
- {uid: db, name: db-0, namespace: data, workloadIps: [10.244.2.7], protocol: HBONE, node: n2, labels: {app: db}}
services:
- {name: web, namespace: default, hostname: web.default.svc.cluster.local, vips: ["/10.96.0.10"], ports: {80: 8080}}
"#;

fn load(extra: &str) -> Snapshot {
    load_str(&format!("{MESH}---\n{extra}"), "test.yaml").expect("loads")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn scenario(name: &str) -> String {
    let path = format!(
        "{}/../../shared/scenarios/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn scenario_entries_become_services_with_automatic_vips() {
    let s = load(&scenario("serviceentry.yaml"));
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    let g = s
        .service_by_key("default/www.googleapis.com")
        .expect("googleapis service");
    let info = g.service_entry.as_ref().expect("entry info");
    assert_eq!(info.resolution, Resolution::Dns);
    assert!(info.auto_vip);
    assert_eq!(info.dns.len(), 1);
    assert_eq!(info.dns[0].hostname, "www.googleapis.com");
    assert_eq!(info.dns[0].target_port(443), 443);
    let vips = s.addresses_for_host("WWW.googleapis.com");
    assert_eq!(vips.len(), 1);
    let IpAddr::V4(v4) = vips[0] else {
        panic!("v4 expected")
    };
    assert!(crate::vip::is_auto_vip(v4), "{v4}");
    let expected = crate::vip::allocate([
        ("default", "www.googleapis.com"),
        ("default", "external-db"),
    ]);
    assert_eq!(
        v4,
        expected[&("default".to_string(), "www.googleapis.com".to_string())]
    );
    assert_eq!(
        s.service_by_vip(vips[0]).map(|s| s.hostname.as_str()),
        Some("www.googleapis.com")
    );
    let db = s
        .service_by_key("default/external-db")
        .expect("external-db");
    assert_eq!(db.ports.keys().copied().collect::<Vec<_>>(), [3306]);
    assert!(s.endpoints(db, 3306).is_empty(), "STATIC without endpoints");
    assert_eq!(s.addresses_for_host("external-db").len(), 1);
}

#[test]
fn static_endpoints_cidrs_and_mesh_endpoints() {
    let s = load(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pg, namespace: default}
spec:
  hosts: [pg.example.com]
  addresses: [10.50.0.9, 10.60.0.0/16]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  resolution: STATIC
  endpoints:
  - {address: 10.250.0.10, ports: {pg: 15432}, labels: {v: a}, locality: eu-west1/eu-west1-b}
  - {address: 10.244.2.7}
"#,
    );
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    let pg = s.service_by_vip(ip("10.50.0.9")).expect("by VIP").clone();
    assert_eq!(pg.hostname, "pg.example.com");
    assert!(!pg.service_entry.as_ref().expect("info").auto_vip);
    assert_eq!(
        s.service_by_cidr(ip("10.60.3.4")).map(|s| s.key()),
        Some(pg.key())
    );
    assert!(s.service_by_cidr(ip("10.61.0.1")).is_none());
    let eps: Vec<(String, u16)> = s
        .endpoints(&pg, 5432)
        .iter()
        .map(|e| (e.workload.workload_ips[0].to_string(), e.target_port))
        .collect();
    assert_eq!(
        eps,
        [
            // The mesh workload owning the address keeps its identity (HBONE); the other is
            // a plain-TCP endpoint workload of the entry.
            ("10.244.2.7".to_string(), 5432),
            ("10.250.0.10".to_string(), 15432),
        ]
    );
    let ext = s
        .workload_by_ip(ip("10.250.0.10"))
        .expect("endpoint workload");
    assert_eq!(ext.protocol, crate::model::Protocol::Tcp);
    assert_eq!(ext.node, "", "on no node: never captured, never local");
    assert_eq!(ext.labels.get("v").map(String::as_str), Some("a"));
    let locality = ext.locality.as_ref().expect("locality");
    assert_eq!(
        (
            locality.region.as_str(),
            locality.zone.as_str(),
            locality.subzone.as_str()
        ),
        ("eu-west1", "eu-west1-b", "")
    );
    let db = s.workload_by_ip(ip("10.244.2.7")).expect("mesh workload");
    assert_eq!(db.name, "db-0");
    assert!(db.services.contains_key("default/pg.example.com"));
}

#[test]
fn workload_selector_and_export_to() {
    let s = load(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: data}
spec:
  hosts: [db.internal]
  ports: [{number: 3306, name: tcp, targetPort: 13306}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {labels: {app: db}}
  exportTo: ["."]
"#,
    );
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    let db = s
        .service_by_key("data/db.internal")
        .expect("service")
        .clone();
    let eps = s.endpoints(&db, 3306);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].workload.name, "db-0");
    assert_eq!(eps[0].target_port, 13306);
    assert!(crate::service_entries::visible_from(&db, "data"));
    assert!(!crate::service_entries::visible_from(&db, "default"));
    let web = s.service_by_key("default/web.default.svc.cluster.local");
    assert!(crate::service_entries::visible_from(web.expect("web"), "x"));
}

#[test]
fn conflicting_entries_are_rejected_alone() {
    let s = load(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: steal-vip, namespace: default}
spec: {hosts: [a.example.com], addresses: [10.96.0.10], ports: [{number: 80, name: http}], resolution: NONE}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: same-host, namespace: default}
spec: {hosts: [web.default.svc.cluster.local], ports: [{number: 80, name: http}], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: fine, namespace: default}
spec: {hosts: [b.example.com], addresses: [10.70.0.1], ports: [{number: 80, name: http}], resolution: NONE}
"#,
    );
    let rejected: Vec<String> = s.rejected.iter().map(|e| e.to_string()).collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert!(
        rejected[0].contains("ServiceEntry default/steal-vip")
            && rejected[0].contains("spec.addresses[0]: 10.96.0.10 is already the VIP of service default/web.default.svc.cluster.local"),
        "{rejected:?}"
    );
    assert!(
        rejected[1].contains("ServiceEntry default/same-host")
            && rejected[1].contains("spec.hosts[0]"),
        "{rejected:?}"
    );
    assert_eq!(
        s.service_by_vip(ip("10.96.0.10")).map(|s| s.name.as_str()),
        Some("web")
    );
    assert!(s.service_by_key("default/b.example.com").is_some());
    assert!(s.service_by_key("default/a.example.com").is_none());
    assert_eq!(
        s.l7.service_entries
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["fine"],
        "rejected entries leave the L7 view too"
    );
}

#[test]
fn headless_service_with_endpoints_joins_the_registry() {
    let s = load(
        r#"apiVersion: v1
kind: Service
metadata: {name: external-db, namespace: default}
spec:
  clusterIP: None
  ports: [{port: 3306, protocol: TCP, targetPort: 3306}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: external-db, namespace: default}
subsets: [{addresses: [{ip: 10.250.0.10}], ports: [{port: 3306, protocol: TCP}]}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: broken, namespace: default}
subsets: [{addresses: [{ip: nope}]}]
"#,
    );
    let rejected: Vec<String> = s.rejected.iter().map(|e| e.to_string()).collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0].contains("Endpoints default/broken"),
        "{rejected:?}"
    );
    let svc = s
        .service_by_key("default/external-db.default.svc.cluster.local")
        .expect("headless service")
        .clone();
    assert!(svc.vips.is_empty(), "headless: no VIP");
    assert!(
        svc.service_entry.is_none(),
        "behaves as a Kubernetes service"
    );
    let w = s
        .workload_by_ip(ip("10.250.0.10"))
        .expect("endpoint workload");
    assert_eq!(w.protocol, crate::model::Protocol::Tcp);
    let eps = s.endpoints(&svc, 3306);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].target_port, 3306);
    assert_eq!(
        s.other_resources.len(),
        1,
        "the Service is still kept verbatim for the dump"
    );
}
