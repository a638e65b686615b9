//! Egress: the users' ServiceEntry and Sidecar scenario files, unchanged. STATIC entries and the
//! headless Service + Endpoints pattern put an outside address into the registry (reachable
//! under REGISTRY_ONLY, named in metrics), NONE entries pass through to the original
//! destination, DNS entries resolve through the node's resolver (a DNS server the test runs in
//! a namespace) and follow a changed answer after its TTL; a Sidecar's egress hosts narrow what
//! REGISTRY_ONLY lets a selected workload reach, ALLOW_ANY passes unknown destinations.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tests::admin::sum_metric;
use tests::apps::{echo_server, probe_echo, Outcome};
use tests::config::Service;
use tests::dns::dns_server;
use tests::mesh::{echo_vip, standard_config, Mesh};
use tests::scenarios::{scenario, EXTERNAL_DB_ENDPOINTS};
use tests::support::{addr, any, eventually};

/// A STATIC entry with its own VIP whose endpoint (pod `d`) listens on another port, and a
/// NONE entry for the node network on port 7000.
const OWN_ENTRIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pg, namespace: default}
spec:
  hosts: [pg.example.com]
  addresses: [10.96.5.5]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 10.244.2.3, ports: {tcp-pg: 15432}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: node-net, namespace: default}
spec:
  hosts: [nodes.example.com]
  addresses: [10.0.0.0/24]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  resolution: NONE
"#;

fn refused(o: &Outcome) -> bool {
    matches!(
        o,
        Outcome::Reset | Outcome::ClosedWithoutData | Outcome::Refused
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_and_none_service_entries_under_registry_only() {
    let config = standard_config()
        .registry_only()
        .document(&scenario("serviceentry.yaml"))
        .document(EXTERNAL_DB_ENDPOINTS)
        .document(OWN_ENTRIES);
    let mesh = Mesh::two_nodes("egress-static", &config).await.unwrap();
    let d = &mesh.pod("d").ns;
    let db = echo_server(d, any(3306)).unwrap();
    let pg = echo_server(d, any(15432)).unwrap();
    let n2 = &mesh.node("n2").ns;
    let node_7000 = echo_server(n2, addr("10.0.0.2:7000")).unwrap();
    let node_7001 = echo_server(n2, addr("10.0.0.2:7001")).unwrap();
    let a = &mesh.pod("a").ns;
    let zt = mesh.ztunnel("n1");
    let t = Duration::from_secs(10);

    // external-db by its endpoint's address: in the registry through the headless Service.
    assert_eq!(
        probe_echo(a, addr("10.244.2.3:3306"), t).await,
        Outcome::Echoed
    );
    db.wait_records(1, t).await.unwrap();
    zt.wait_log_line(
        &[
            "chain=\"outbound_tcp\"",
            "dst=10.244.2.3:3306",
            "dst_service=external-db.default.svc.cluster.local",
        ],
        t,
    )
    .await
    .unwrap();

    // pg by its VIP: STATIC picks the endpoint and maps the port by name.
    assert_eq!(
        probe_echo(a, addr("10.96.5.5:5432"), t).await,
        Outcome::Echoed
    );
    pg.wait_records(1, t).await.unwrap();
    zt.wait_log_line(
        &[
            "dst=10.96.5.5:5432",
            "upstream=10.244.2.3:15432",
            "dst_service=pg.example.com",
        ],
        t,
    )
    .await
    .unwrap();

    // NONE: the declared port passes through to the original destination, others are not in
    // the registry.
    assert_eq!(
        probe_echo(a, addr("10.0.0.2:7000"), t).await,
        Outcome::Echoed
    );
    node_7000.wait_records(1, t).await.unwrap();
    zt.wait_log_line(
        &[
            "chain=\"passthrough\"",
            "dst=10.0.0.2:7000",
            "dst_service=nodes.example.com",
        ],
        t,
    )
    .await
    .unwrap();
    let o = probe_echo(a, addr("10.0.0.2:7001"), t).await;
    assert!(refused(&o), "an undeclared port was not refused: {o:?}");
    zt.wait_log_line(
        &[
            "outbound_refused",
            "dst=10.0.0.2:7001",
            "refused by mesh outboundTrafficPolicy REGISTRY_ONLY",
        ],
        t,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        node_7001.records().is_empty(),
        "the refused server was reached"
    );

    // Metrics name the entries' hosts.
    let named = eventually(t, || async move {
        let m = zt.metrics().await?;
        Ok([
            "external-db.default.svc.cluster.local",
            "pg.example.com",
            "nodes.example.com",
        ]
        .iter()
        .all(|svc| {
            sum_metric(
                &m,
                "istio_tcp_connections_opened_total",
                &[("destination_service", svc), ("source_workload", "a")],
            ) >= 1.0
        }))
    })
    .await;
    assert!(matches!(named, Ok(true)), "metrics: {named:?}");
}

/// The Sidecar of the scenario selects pod `a` (`run: client`): only `./*` hosts on port 8080
/// are reachable for it; pod `c` has no Sidecar and the mesh default ALLOW_ANY applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_egress_hosts_narrow_registry_only() {
    let mut other = Service::new("echo-other", "10.96.0.11").port(8080, 9000);
    other.namespace = "other".to_string();
    let mut config = standard_config()
        .service(other)
        .endpoint("b", "echo-other")
        .document(&scenario("sidecar-egress.yaml"));
    config.workloads[0] = config.workloads[0].clone().label("run", "client");
    let mesh = Mesh::two_nodes("egress-sidecar", &config).await.unwrap();
    let _b = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let unknown = echo_server(&mesh.node("n2").ns, addr("10.0.0.2:7000")).unwrap();
    let (a, c) = (&mesh.pod("a").ns, &mesh.pod("c").ns);
    let zt = mesh.ztunnel("n1");
    let t = Duration::from_secs(10);

    assert_eq!(
        probe_echo(a, echo_vip(), t).await,
        Outcome::Echoed,
        "./* on 8080"
    );
    let o = probe_echo(a, addr("10.96.0.11:8080"), t).await;
    assert!(
        refused(&o),
        "a service of another namespace was not refused: {o:?}"
    );
    zt.wait_log_line(
        &[
            "outbound_refused",
            "dst=10.96.0.11:8080",
            "refused by Sidecar default/client (REGISTRY_ONLY)",
        ],
        t,
    )
    .await
    .unwrap();
    let o = probe_echo(a, addr("10.0.0.2:7000"), t).await;
    assert!(refused(&o), "an unknown destination was not refused: {o:?}");

    // Not selected by the Sidecar: mesh default ALLOW_ANY, everything passes.
    assert_eq!(
        probe_echo(c, addr("10.96.0.11:8080"), t).await,
        Outcome::Echoed
    );
    assert_eq!(
        probe_echo(c, addr("10.0.0.2:7000"), t).await,
        Outcome::Echoed
    );
    unknown.wait_records(1, t).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        unknown.records().len(),
        1,
        "only c reached the unknown server"
    );

    // The same Sidecar switched to ALLOW_ANY: a passes unknown destinations too.
    let allow_any = scenario("sidecar-egress.yaml").replace("REGISTRY_ONLY", "ALLOW_ANY");
    let mut config = config.clone();
    config.documents.pop();
    let config = config.document(&allow_any);
    mesh.write_config(&config).unwrap();
    mesh.wait_config(Duration::from_secs(15), |d| {
        d.contains("ALLOW_ANY") && !d.contains("REGISTRY_ONLY")
    })
    .await
    .unwrap();
    assert_eq!(
        probe_echo(a, addr("10.0.0.2:7000"), t).await,
        Outcome::Echoed
    );
    assert_eq!(
        probe_echo(a, addr("10.96.0.11:8080"), t).await,
        Outcome::Echoed
    );
}

/// The auto-allocated VIP of `host` as ztunnel's `/config_dump` shows it.
async fn vip_of(mesh: &Mesh, host: &str) -> SocketAddr {
    let ip = mesh.ztunnel("n1").service_vip(host).await.unwrap();
    let std::net::IpAddr::V4(v4) = ip else {
        panic!("{host}: automatic VIPs are IPv4, got {ip}")
    };
    assert_eq!(&v4.octets()[..2], &[240, 240], "auto VIP range");
    SocketAddr::new(ip, 443)
}

/// The scenario's DNS entry for www.googleapis.com, resolved by a DNS server on node n2 that
/// answers with pod d's address, then (after the TTL) with node n2's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_service_entry_resolves_and_follows_a_changed_answer() {
    const TTL: u32 = 2;
    let dir = tests::testdir::TestDir::new("egress-dns-conf").unwrap();
    let resolv = dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 10.0.0.2\noptions timeout:1 attempts:2\n",
    )
    .unwrap();
    let config = standard_config()
        .registry_only()
        .document(&scenario("serviceentry.yaml"));
    let mesh = Mesh::two_nodes_with("egress-dns", &config, |_, opts| {
        opts.extra_args.push("--resolv-conf".into());
        opts.extra_args.push(resolv.display().to_string());
    })
    .await
    .unwrap();
    let n2 = &mesh.node("n2").ns;
    let dns = dns_server(
        n2,
        addr("10.0.0.2:53"),
        "www.googleapis.com",
        Ipv4Addr::new(10, 244, 2, 3),
        TTL,
    )
    .unwrap();
    let first = echo_server(&mesh.pod("d").ns, any(443)).unwrap();
    let second = echo_server(n2, addr("10.0.0.2:443")).unwrap();
    let a = &mesh.pod("a").ns;
    let zt = mesh.ztunnel("n1");
    let t = Duration::from_secs(10);
    let vip = vip_of(&mesh, "www.googleapis.com").await;

    assert_eq!(probe_echo(a, vip, t).await, Outcome::Echoed);
    first.wait_records(1, t).await.unwrap();
    zt.wait_log_line(
        &[
            "chain=\"outbound_dns\"",
            &format!("dst={vip}"),
            "upstream=10.244.2.3:443",
            "dst_service=www.googleapis.com",
        ],
        t,
    )
    .await
    .unwrap();
    // A fresh answer is used without asking again.
    let asked = dns.queries();
    assert_eq!(probe_echo(a, vip, t).await, Outcome::Echoed);
    assert_eq!(
        dns.queries(),
        asked,
        "a cached answer must not cost a query"
    );

    // The answer changes; the background refresh picks it up within the TTL (plus slack).
    dns.set_answer(Ipv4Addr::new(10, 0, 0, 2));
    tokio::time::sleep(Duration::from_secs(u64::from(TTL) + 2)).await;
    assert!(
        dns.queries() > asked,
        "the name was not refreshed in the background ({} queries)",
        dns.queries()
    );
    assert_eq!(probe_echo(a, vip, t).await, Outcome::Echoed);
    second.wait_records(1, t).await.unwrap();
    assert_eq!(
        first.records().len(),
        2,
        "the old address is no longer used"
    );
}
