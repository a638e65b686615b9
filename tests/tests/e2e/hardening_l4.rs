//! L4 hardening: a configuration change reaches live connections (a new DENY closes the
//! cross-node HBONE and same-node connections it now denies, a switch to STRICT closes live
//! plaintext), and source addresses cannot be forged: a mesh peer's `forwarded` header is
//! ignored, tunnels leave from the client pod's own address, and a pod cannot send from a
//! neighbour's address (the `source_*` tests).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use tests::admin::sum_metric;
use tests::apps::{echo_roundtrip, echo_server, probe_echo, Outcome};
use tests::capture::Capture;
use tests::hbone;
use tests::mesh::{echo_vip, standard_config, Mesh};
use tests::support::{addr, any, closed_within};

const PROBE: Duration = Duration::from_secs(10);
const RELOAD: Duration = Duration::from_secs(15);

fn assert_denied(outcome: &Outcome, what: &str) {
    assert!(
        matches!(outcome, Outcome::Reset | Outcome::ClosedWithoutData),
        "{what}: expected reset/closed without data, got {outcome:?}"
    );
}

const DENY_9000: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-9000
  namespace: default
spec:
  action: DENY
  rules:
  - to:
    - operation:
        ports: ["9000"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_deny_policy_closes_live_connections() {
    let mesh = Mesh::two_nodes("revoke-deny", &standard_config())
        .await
        .unwrap();
    let _b = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let _c = echo_server(&mesh.pod("c").ns, any(9000)).unwrap();
    let _c_other = echo_server(&mesh.pod("c").ns, any(9001)).unwrap();
    let a = &mesh.pod("a").ns;
    // Cross-node (HBONE to n2) and same-node (a → c on n1) connections, plus one the new
    // policy does not cover.
    let mut remote = a.connect(echo_vip()).await.unwrap();
    let mut local = a.connect(addr("10.244.1.3:9000")).await.unwrap();
    let mut other = a.connect(addr("10.244.1.3:9001")).await.unwrap();
    for s in [&mut remote, &mut local, &mut other] {
        echo_roundtrip(s, b"before the policy").await.unwrap();
    }

    mesh.write_config(&standard_config().document(DENY_9000))
        .unwrap();
    mesh.wait_config(RELOAD, |d| d.contains("deny-9000"))
        .await
        .unwrap();
    assert!(
        closed_within(&mut remote, Duration::from_secs(5)).await,
        "the live cross-node connection stayed open under the new DENY"
    );
    assert!(
        closed_within(&mut local, Duration::from_secs(5)).await,
        "the live same-node connection stayed open under the new DENY"
    );
    echo_roundtrip(&mut other, b"still allowed")
        .await
        .expect("a connection the policy does not deny stays open");

    assert_denied(&probe_echo(a, echo_vip(), PROBE).await, "new a → echo");
    assert_denied(
        &probe_echo(a, addr("10.244.1.3:9000"), PROBE).await,
        "new a → c:9000",
    );

    for (node, path) in [("n2", "inbound_hbone"), ("n1", "outbound_local")] {
        let z = mesh.ztunnel(node);
        let line = z
            .wait_log_line(&["closing live connection", path], Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            line.contains("default/deny-9000"),
            "the log line names the policy: {line}"
        );
        let revoked = sum_metric(
            &z.metrics().await.unwrap(),
            "ztunnel_connections_revoked_total",
            &[],
        );
        assert_eq!(revoked, 1.0, "revoked connections counted on {node}");
    }
}

fn peer_authentication(mode: &str) -> String {
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: default
spec:
  mtls:
    mode: {mode}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_to_strict_closes_live_plaintext() {
    let permissive = standard_config().document(&peer_authentication("PERMISSIVE"));
    let mesh = Mesh::two_nodes("revoke-strict", &permissive).await.unwrap();
    let _b = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    // The node n1 itself is outside the mesh: its plaintext lands on n2's 15006.
    let n1 = &mesh.node("n1").ns;
    let mut plain = n1.connect(addr("10.244.2.2:9000")).await.unwrap();
    echo_roundtrip(&mut plain, b"plaintext while permissive")
        .await
        .unwrap();
    let mut mtls = mesh.pod("a").ns.connect(echo_vip()).await.unwrap();
    echo_roundtrip(&mut mtls, b"mtls").await.unwrap();

    mesh.write_config(&standard_config().document(&peer_authentication("STRICT")))
        .unwrap();
    mesh.wait_config(RELOAD, |d| d.contains("STRICT") || d.contains("Strict"))
        .await
        .unwrap();
    assert!(
        closed_within(&mut plain, Duration::from_secs(5)).await,
        "live plaintext stayed open after the switch to STRICT"
    );
    echo_roundtrip(&mut mtls, b"mtls still fine")
        .await
        .expect("mTLS connections are unaffected by STRICT");
    assert_denied(
        &probe_echo(n1, addr("10.244.2.2:9000"), PROBE).await,
        "new plaintext under STRICT",
    );
    let line = mesh
        .ztunnel("n2")
        .wait_log_line(
            &["closing live connection", "inbound_plaintext"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(line.contains("STRICT"), "{line}");
}

/// An ALLOW for the `server` pods from exactly these source addresses.
fn allow_from_ips(ips: &[&str]) -> String {
    let list: Vec<String> = ips.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: server-by-ip
  namespace: default
spec:
  selector:
    matchLabels:
      app: server
  action: ALLOW
  rules:
  - from:
    - source:
        ipBlocks: [{}]
"#,
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_forged_forwarded_header_is_ignored() {
    // Only c's address may reach b. A mesh peer with a valid workload certificate (sa-a), on
    // node n1's own address, claims to speak for c with `forwarded: for=`.
    let config = standard_config().document(&allow_from_ips(&["10.244.1.3/32"]));
    let mesh = Mesh::two_nodes("forged-forwarded", &config).await.unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let cert = mesh
        .ca
        .issue(
            "spiffe://cluster.local/ns/default/sa/sa-a",
            &mesh.dir.join("peer-cert"),
        )
        .unwrap();
    let mut conn =
        hbone::HboneConnection::open(&mesh.node("n1").ns, addr("10.244.2.2:15008"), Some(&cert))
            .await
            .unwrap();
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("10.244.2.2:9000")
        .header("forwarded", "for=\"10.244.1.3:40000\"")
        .body(())
        .unwrap();
    let mut tunnel = conn.request(req, false).await.unwrap();
    if tunnel.status == 200 {
        let echoed = tunnel.echo(b"forged").await.unwrap_or_default();
        panic!(
            "a forged `forwarded` was authorized as c (echoed {:?}, b saw {:?})",
            String::from_utf8_lossy(&echoed),
            server.peer_ips()
        );
    }
    assert_eq!(tunnel.status, 401, "the peer's own address is not allowed");
    let line = mesh
        .ztunnel("n2")
        .wait_log_line(&["inbound_hbone", "401"], Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        line.contains("10.0.0.1") && !line.contains("src=10.244.1.3"),
        "the access log shows the TCP peer as the source: {line}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.records().is_empty(), "b was reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_tunnel_leaves_from_the_pod_address() {
    // Only a's address may reach b: the destination ztunnel must see a's address as the TCP
    // peer of the tunnel (no header needed), and so must the wire between the nodes.
    let config = standard_config().document(&allow_from_ips(&["10.244.1.2/32"]));
    let mesh = Mesh::two_nodes("pod-source", &config).await.unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let n2 = mesh.node("n2");
    let pcap_file = mesh.dir.join("link.pcap");
    let capture = Capture::start(&n2.ns, &n2.link_if, &pcap_file).unwrap();

    assert_eq!(
        probe_echo(&mesh.pod("a").ns, echo_vip(), PROBE).await,
        Outcome::Echoed,
        "a is allowed by its own address"
    );
    assert_denied(
        &probe_echo(&mesh.pod("c").ns, echo_vip(), PROBE).await,
        "c is not allowed",
    );
    let pcap = capture.stop().unwrap();
    let to_hbone: Vec<_> = pcap.tcp().filter(|p| p.dst_port == 15008).collect();
    assert!(
        !to_hbone.is_empty(),
        "no HBONE traffic captured on the link"
    );
    for p in &to_hbone {
        assert!(
            p.src == Ipv4Addr::new(10, 244, 1, 2) || p.src == Ipv4Addr::new(10, 244, 1, 3),
            "the tunnel left from {} (the node?), not from the pod: {p:?}",
            p.src
        );
    }
    assert!(
        to_hbone
            .iter()
            .any(|p| p.src == Ipv4Addr::new(10, 244, 1, 2)),
        "a's tunnel did not leave from a's address"
    );
    assert_eq!(server.peer_ips(), vec![IpAddr::from([10, 244, 1, 2])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_spoofed_from_wrong_interface_is_dropped() {
    // c takes a's address and, with the node's route to a's address pointing at c (what a
    // bridged network or a poisoned neighbour table would give it), opens a connection as a.
    // The interface check drops it before ztunnel can take it for a's.
    let mesh = Mesh::two_nodes("spoof-iface", &standard_config())
        .await
        .unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let c = &mesh.pod("c");
    assert_eq!(
        probe_echo(&c.ns, echo_vip(), PROBE).await,
        Outcome::Echoed,
        "c from its own address works"
    );
    c.ns.ip(&["addr", "add", "10.244.1.2/32", "dev", "eth0"])
        .unwrap();
    mesh.node("n1")
        .ns
        .ip(&["route", "replace", "10.244.1.2/32", "dev", &c.host_if])
        .unwrap();
    let socket = c.ns.tcp_socket().unwrap();
    socket.bind(addr("10.244.1.2:0")).unwrap();
    let attempt = async {
        let mut s = socket.connect(echo_vip()).await?;
        echo_roundtrip(&mut s, b"spoofed").await?;
        anyhow::Ok(())
    };
    let spoofed = tokio::time::timeout(Duration::from_secs(5), attempt).await;
    assert!(
        !matches!(spoofed, Ok(Ok(()))),
        "c's connection from a's address went through (b saw {:?})",
        server.peer_ips()
    );
    assert_eq!(
        server.peer_ips(),
        vec![IpAddr::from([10, 244, 1, 3])],
        "only c's own connection reached b"
    );
}

/// A DENY with HTTP fields, added live: the endpoint's ztunnel skips such policies for the
/// waypoint's connections, so only the waypoint's own revalidation can close a live L4 stream.
const DENY_ADMIN_PATHS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: echo-deny-admin
  namespace: default
spec:
  selector:
    matchLabels:
      app: echo
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin/*"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_policy_closes_live_l4_stream_at_the_waypoint() {
    let mesh = tests::l7mesh::L7Mesh::builder("revoke-wp")
        .port(7000, 7000)
        .start()
        .await
        .unwrap();
    let echo = echo_server(&mesh.pod("b").ns, any(7000)).unwrap();
    let a = &mesh.pod("a").ns;
    let mut s = a.connect(mesh.vip_port(7000)).await.unwrap();
    echo_roundtrip(&mut s, b"HELLO not http\r\n").await.unwrap();

    let config = mesh.config.clone().document(DENY_ADMIN_PATHS);
    mesh.write_config(&config).unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(10)).await,
        "the live L4 stream stayed open under the new DENY"
    );
    let wp = mesh.waypoint();
    wp.wait_log_line(
        &["closing live connection", "default/echo-deny-admin"],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let revoked = sum_metric(
        &wp.metrics().await.unwrap(),
        "waypoint_connections_revoked_total",
        &[],
    );
    assert_eq!(revoked, 1.0);
    // Through the waypoint b's ztunnel still delivered for a's own address: the waypoint's
    // `forwarded` is trusted (known waypoint identity at the waypoint's address).
    mesh.ztunnel("n2")
        .wait_log_line(
            &["inbound_hbone", "src=10.244.1.2:", "sa/waypoint"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(echo.peer_ips(), vec![IpAddr::from([10, 244, 1, 2])]);
}
