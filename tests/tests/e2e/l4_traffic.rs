//! L4 traffic through the mesh: service VIPs to remote and local endpoints, what the node link
//! carries, unknown destinations (passthrough vs REGISTRY_ONLY), and many concurrent tunnels.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tests::apps::{
    echo_pattern, echo_random, echo_roundtrip, echo_server, hash_server, probe_echo, random_bytes,
    send_to_hash_server, Outcome,
};
use tests::capture::Capture;
use tests::mesh::{echo_vip, raise_nofile_limit, standard_config, Mesh};
use tests::support::{addr, any, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POD_A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 244, 1, 2));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_to_remote_endpoint_preserves_bytes_and_source_ip() {
    let mesh = Mesh::two_nodes("vip-remote", &standard_config())
        .await
        .unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();

    let stream = mesh.pod("a").ns.connect(echo_vip()).await.unwrap();
    let t = within(240, "64 MiB echo", echo_random(stream, 64 << 20, 1))
        .await
        .unwrap();

    assert_eq!(
        t.received_bytes,
        64 << 20,
        "bytes lost or added on the way back"
    );
    assert_eq!(t.received_sha256, t.sent_sha256, "echo corrupted");
    let rec = &server
        .wait_records(1, Duration::from_secs(10))
        .await
        .unwrap()[0];
    assert_eq!(rec.bytes, 64 << 20);
    assert_eq!(rec.sha256, t.sent_sha256, "server received different bytes");
    assert_eq!(rec.peer.ip(), POD_A, "server must see the client's pod IP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_link_carries_only_tls() {
    let mesh = Mesh::two_nodes("only-tls", &standard_config())
        .await
        .unwrap();
    let _server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let n1 = mesh.node("n1");
    let capture = Capture::start(&n1.ns, &n1.link_if, &mesh.dir.join("link.pcap")).unwrap();

    let pattern = b"ZTUNNEL-PLAINTEXT-CANARY-7f3a9c";
    let stream = mesh.pod("a").ns.connect(echo_vip()).await.unwrap();
    let t = within(120, "pattern echo", echo_pattern(stream, 4 << 20, pattern))
        .await
        .unwrap();
    assert!(t.echoed_intact(), "{t:?}");

    let pcap = capture.stop().unwrap();
    assert_eq!(pcap.dropped, 0, "capture incomplete: {}", pcap.summary);
    assert!(
        pcap.tcp_payload_bytes() >= 2 * (4 << 20),
        "the flow did not cross the captured link ({} payload bytes)",
        pcap.tcp_payload_bytes()
    );
    assert!(!pcap.contains(pattern), "plaintext seen on the node link");
    let stray: Vec<_> = pcap
        .tcp()
        .filter(|p| p.src_port != 15008 && p.dst_port != 15008)
        .collect();
    assert!(
        stray.is_empty(),
        "TCP not to/from 15008 on the node link: {:?}",
        &stray[..stray.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_destination_passes_through() {
    let mesh = Mesh::two_nodes("passthrough", &standard_config())
        .await
        .unwrap();
    // A server on node 2 itself: not a workload, not a service.
    let server = hash_server(&mesh.node("n2").ns, addr("10.0.0.2:7000")).unwrap();

    let stream = mesh
        .pod("a")
        .ns
        .connect(addr("10.0.0.2:7000"))
        .await
        .unwrap();
    within(60, "passthrough", send_to_hash_server(stream, 1 << 20, 5))
        .await
        .unwrap();
    server
        .wait_records(1, Duration::from_secs(5))
        .await
        .unwrap();
    // It went through n1's ztunnel (captured), not around it.
    mesh.ztunnel("n1")
        .wait_log_line(&["10.244.1.2", "10.0.0.2:7000"], Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_only_refuses_unknown_destination() {
    let mesh = Mesh::two_nodes("registry-only", &standard_config().registry_only())
        .await
        .unwrap();
    assert_unknown_refused_but_services_reachable(&mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_registry_only_scenario_refuses_unknown_destination() {
    let scenario = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/scenarios/sidecar-egress.yaml"
    );
    let yaml = std::fs::read_to_string(scenario)
        .unwrap_or_else(|e| panic!("reading scenario {scenario}: {e}"));
    let mut config = standard_config();
    config.workloads[0] = config.workloads[0].clone().label("run", "client");
    let mesh = Mesh::two_nodes("sidecar-egress", &config.document(&yaml))
        .await
        .unwrap();
    assert_unknown_refused_but_services_reachable(&mesh).await;
}

/// From pod a: the echo service answers, a server on node 2 that the registry does not know is
/// refused without data and never sees a connection.
async fn assert_unknown_refused_but_services_reachable(mesh: &Mesh) {
    let _service = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let unknown = echo_server(&mesh.node("n2").ns, addr("10.0.0.2:7000")).unwrap();
    let a = &mesh.pod("a").ns;

    let outcome = probe_echo(a, addr("10.0.0.2:7000"), Duration::from_secs(10)).await;
    assert!(
        matches!(
            outcome,
            Outcome::Reset | Outcome::ClosedWithoutData | Outcome::Refused
        ),
        "unknown destination not refused: {outcome:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        unknown.records().is_empty(),
        "the unknown server was reached"
    );
    let outcome = probe_echo(a, echo_vip(), Duration::from_secs(10)).await;
    assert_eq!(
        outcome,
        Outcome::Echoed,
        "the registered service must stay reachable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_pod_to_pod() {
    let mesh = Mesh::two_nodes("same-node", &standard_config())
        .await
        .unwrap();
    let _sink = hash_server(&mesh.pod("c").ns, any(9000)).unwrap();

    let stream = mesh
        .pod("a")
        .ns
        .connect(addr("10.244.1.3:9000"))
        .await
        .unwrap();
    let reply = within(60, "a → c", send_to_hash_server(stream, 8 << 20, 9))
        .await
        .unwrap();
    assert_eq!(reply.peer.ip(), POD_A, "c must see a's pod IP");
    // It went through n1's ztunnel (captured), not straight over the node's routes.
    mesh.ztunnel("n1")
        .wait_log_line(&["10.244.1.2", "10.244.1.3:9000"], Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_tunnelled_connections() {
    const N: usize = 1000;
    const LEN: usize = 16 << 10;
    raise_nofile_limit(65536).unwrap();
    let mesh = Mesh::two_nodes("thousand", &standard_config())
        .await
        .unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();

    let sockets = mesh.pod("a").ns.tcp_sockets(N).unwrap();
    let connecting = Arc::new(tokio::sync::Semaphore::new(100));
    let all_open = Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let (connecting, all_open) = (connecting.clone(), all_open.clone());
        tasks.spawn(async move {
            let data = random_bytes(LEN, 1000 + i as u64);
            let permit = connecting.acquire().await.unwrap();
            let mut stream = socket.connect(echo_vip()).await?;
            drop(permit);
            echo_roundtrip(&mut stream, &data).await?;
            // Every connection is open and has carried its data before any closes.
            all_open.wait().await;
            stream.shutdown().await?;
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await?;
            anyhow::ensure!(rest.is_empty(), "extra bytes after the echo");
            anyhow::Ok(tests::apps::hex(&<sha2::Sha256 as sha2::Digest>::digest(
                &data,
            )))
        });
    }
    let mut sent = Vec::new();
    within(300, "1000 concurrent connections", async {
        while let Some(r) = tasks.join_next().await {
            sent.push(r.unwrap().expect("connection failed"));
        }
    })
    .await;

    let records = server
        .wait_records(N, Duration::from_secs(30))
        .await
        .unwrap();
    let mut received: Vec<String> = records.iter().map(|r| r.sha256.clone()).collect();
    sent.sort();
    received.sort();
    assert_eq!(
        received, sent,
        "server did not receive each connection's own data"
    );
    assert_eq!(server.peer_ips(), vec![POD_A]);
}
