//! Egress through a waypoint: ServiceEntry hosts bound to a waypoint (`istio.io/use-waypoint` on
//! the entry, or on its namespace, as Istio ambient binds them) are routed by it. The users'
//! serviceentry.yaml unchanged: the DNS entry for www.googleapis.com resolves at the waypoint
//! (through a DNS server the test runs) and its 10 s timeout VirtualService answers 504 for a
//! slower upstream; a STATIC entry's DestinationRule subsets select by endpoint labels, among
//! an endpoint outside the mesh (plain TCP from the waypoint) and a mesh pod (HBONE).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tests::apps::{echo_server, probe_echo, Outcome};
use tests::dns::dns_server;
use tests::http_apps::{http_server, Http1Client, HttpMode};
use tests::l7mesh::{L7Mesh, PodSpec, WAYPOINT_NAME};
use tests::scenarios::scenario;
use tests::support::{addr, any};
use tests::waypoint::field;

/// The L7 mesh's waypoint as a Gateway (its pod carries the `gateway-name` label).
const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

/// Node n2's address: outside the mesh, reachable from the waypoint pod.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// www.googleapis.com (scenario file unchanged, bound through its namespace's label) resolves
/// at the waypoint to a server outside the mesh, reached from the waypoint's own address;
/// the VirtualService's 10 s timeout answers 504 (`UT`) for a slower response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_service_entry_behind_a_waypoint_keeps_its_virtual_service_timeout() {
    let dir = tests::testdir::TestDir::new("egress-wp-dns-conf").unwrap();
    let resolv = dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {OUTSIDE}\noptions timeout:1\n"),
    )
    .unwrap();
    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/use-waypoint: waypoint}}\n";
    let mesh = L7Mesh::builder("egress-wp-dns")
        .document(&scenario("serviceentry.yaml"))
        .document(GATEWAY)
        .document(namespace)
        .waypoint_arg("--resolv-conf")
        .waypoint_arg(&resolv.display().to_string())
        .start()
        .await
        .unwrap();
    let n2 = &mesh.mesh.node("n2").ns;
    let _dns = dns_server(n2, addr("10.0.0.2:53"), "www.googleapis.com", OUTSIDE, 30).unwrap();
    let google = http_server(n2, addr("10.0.0.2:80"), "googleapis", HttpMode::Auto).unwrap();
    let vip = mesh.ztunnel("n1").service_vip("www.googleapis.com").await;
    let vip = SocketAddr::new(vip.unwrap(), 80);

    let mut c = Http1Client::connect(&mesh.pod("a").ns, vip).await.unwrap();
    c.host = "www.googleapis.com".into();
    let r = c.get("/quick", &[("x-delay-ms", "50")]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-pod"), Some("googleapis"));
    // Egress leaves from the waypoint, which resolved the name (not from ztunnel).
    let seen = google.records();
    assert_eq!(
        seen[0].peer.ip(),
        IpAddr::V4(mesh.waypoint_pod().ip),
        "{seen:?}"
    );
    assert_eq!(seen[0].header("host"), Some("www.googleapis.com"));
    let t = Instant::now();
    let r = c.get("/slow", &[("x-delay-ms", "13000")]).await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        took >= Duration::from_millis(9500) && took < Duration::from_secs(13),
        "504 after {took:?}: the VirtualService's timeout is 10s"
    );
    let e = mesh
        .waypoint()
        .wait_access_log(1, Duration::from_secs(10), |e| field(e, "path") == "/slow")
        .await
        .unwrap();
    assert_eq!(field(&e[0], "response_flags"), "UT", "{}", e[0]);
    assert_eq!(
        field(&e[0], "upstream_cluster"),
        "outbound|80||www.googleapis.com",
        "{}",
        e[0]
    );
    // ztunnel sent the connection to the waypoint (logged when it closes).
    drop(c);
    mesh.ztunnel("n1")
        .wait_log_line(
            &["chain=\"outbound_waypoint\"", &format!("dst={vip}")],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

/// An entry labelled for the waypoint with two endpoints: one outside the mesh (version v1)
/// and one mesh pod (version v2). A DestinationRule's subsets select them by label, a
/// VirtualService routes by header; TCP to the entry goes through the waypoint too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_service_entry_subsets_select_endpoints_by_label_through_a_waypoint() {
    let builder = L7Mesh::builder("egress-wp-static")
        .other_pod(PodSpec::new("d", &[("version", "v2")]))
        .document(GATEWAY);
    // The mesh pod `d` is the last pod before the waypoint on n2.
    let d_ip = Ipv4Addr::from(u32::from(builder.waypoint_ip()) - 1);
    let entry = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payments, namespace: default, labels: {{istio.io/use-waypoint: {WAYPOINT_NAME}}}}}
spec:
  hosts: [payments.example.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}, {{number: 5432, name: tcp-db, protocol: TCP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints:
  - {{address: {OUTSIDE}, labels: {{version: v1}}}}
  - {{address: {d_ip}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payments, namespace: default}}
spec:
  host: payments.example.com
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payments, namespace: default}}
spec:
  hosts: [payments.example.com]
  http:
  - match: [{{headers: {{x-version: {{exact: v2}}}}}}]
    route: [{{destination: {{host: payments.example.com, subset: v2}}}}]
  - route: [{{destination: {{host: payments.example.com, subset: v1}}}}]
"#
    );
    let mesh = builder.document(&entry).start().await.unwrap();
    let n2 = &mesh.mesh.node("n2").ns;
    let outside = http_server(n2, addr("10.0.0.2:80"), "outside-v1", HttpMode::Auto).unwrap();
    let d = &mesh.pod("d").ns;
    let _inside = http_server(d, any(80), "d", HttpMode::Auto).unwrap();
    let vip = mesh.ztunnel("n1").service_vip("payments.example.com").await;
    let vip = vip.unwrap();

    let mut c = Http1Client::connect(&mesh.pod("a").ns, SocketAddr::new(vip, 80))
        .await
        .unwrap();
    c.host = "payments.example.com".into();
    for _ in 0..4 {
        let r = c.get("/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pod"), Some("outside-v1"), "subset v1");
        let r = c.get("/", &[("x-version", "v2")]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pod"), Some("d"), "subset v2 (the mesh pod)");
    }
    // The outside endpoint is reached in plain TCP from the waypoint's address.
    let peers: Vec<IpAddr> = outside.records().iter().map(|r| r.peer.ip()).collect();
    assert!(
        peers
            .iter()
            .all(|p| *p == IpAddr::V4(mesh.waypoint_pod().ip)),
        "{peers:?}"
    );

    // Not HTTP: the waypoint forwards the bytes to an endpoint of the entry.
    let _db_outside = echo_server(n2, addr("10.0.0.2:5432")).unwrap();
    let _db_inside = echo_server(d, any(5432)).unwrap();
    let t = Duration::from_secs(10);
    for _ in 0..2 {
        let o = probe_echo(&mesh.pod("a").ns, SocketAddr::new(vip, 5432), t).await;
        assert_eq!(o, Outcome::Echoed);
    }
    mesh.waypoint()
        .wait_log_line(&[r#""chain":"waypoint_tcp""#, "tcp connection complete"], t)
        .await
        .unwrap();
}
