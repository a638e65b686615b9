//! L4 routing decisions of the outbound filter chain: round robin over a service's healthy
//! endpoints, target-port mapping, direct pod IPs across nodes, plain TCP to non-mesh workloads,
//! the node's own (kubelet-probe) connections to its mesh pods, and HBONE connection pooling.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tests::apps::{echo_pattern, echo_random, echo_roundtrip, echo_server, probe_echo, Server};
use tests::apps::{random_bytes, Outcome, Transfer};
use tests::capture::Capture;
use tests::config::{MeshConfig, Service, Workload};
use tests::mesh::{echo_vip, raise_nofile_limit, standard_config, Mesh, ECHO_PORT, ECHO_VIP};
use tests::netns::Netns;
use tests::support::{addr, any, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POD_A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2));
const RELOAD: Duration = Duration::from_secs(15);

/// One short echo exchange from `ns` to `dst`; panics unless the bytes came back intact.
async fn echo_once(ns: &Netns, dst: SocketAddr, seed: u64) -> Transfer {
    let stream = within(10, &format!("connect to {dst}"), ns.connect(dst))
        .await
        .unwrap();
    let t = within(
        30,
        &format!("echo via {dst}"),
        echo_random(stream, 4096, seed),
    )
    .await
    .unwrap();
    assert!(
        t.echoed_intact(),
        "echo via {dst} (seed {seed}) not intact: {t:?}"
    );
    t
}

/// Waits until the servers together recorded `n` finished connections, then a little longer
/// so that a stray extra connection would show up too; returns each server's count.
async fn settle_counts(servers: &[&Server], n: usize) -> Vec<usize> {
    let counts = || {
        servers
            .iter()
            .map(|s| s.records().len())
            .collect::<Vec<_>>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while counts().iter().sum::<usize>() < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    counts()
}

/// The standard mesh plus pod `d` (n2) as a second HBONE endpoint of `echo`, healthy or not.
fn two_endpoint_config(d_healthy: bool) -> MeshConfig {
    let d = Workload::hbone("d", "10.244.2.3", "n2").label("app", "server");
    let d = if d_healthy { d } else { d.unhealthy() };
    standard_config().workload(d).endpoint("d", "echo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_round_robins_across_endpoints() {
    const N: usize = 20;
    let mesh = Mesh::two_nodes("rr", &two_endpoint_config(true))
        .await
        .unwrap();
    let b = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let d = echo_server(&mesh.pod("d").ns, any(9000)).unwrap();
    let a = mesh.pod("a").ns.handle();

    for i in 0..N {
        echo_once(&a, echo_vip(), i as u64).await;
    }
    let counts = settle_counts(&[&b, &d], N).await;
    let (nb, nd) = (counts[0], counts[1]);
    assert_eq!(
        nb + nd,
        N,
        "b saw {nb}, d saw {nd}: connections lost or duplicated"
    );
    assert!(nb > 0 && nd > 0, "one endpoint got nothing: b {nb}, d {nd}");
    assert!(
        nb.abs_diff(nd) <= 1,
        "not round robin: b got {nb}, d got {nd} of {N} sequential connections"
    );
    for r in b.records().iter().chain(d.records().iter()) {
        assert_eq!(r.peer.ip(), POD_A, "endpoint must see the client's pod IP");
    }
    // Both endpoints were reached through the tunnel to their node.
    for upstream in ["upstream=10.244.2.2:15008", "upstream=10.244.2.3:15008"] {
        mesh.ztunnel("n1")
            .wait_log_line(
                &["chain=\"outbound_hbone\"", "dst=10.96.0.10:8080", upstream],
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }

    // Reload with d Unhealthy: it must leave the endpoint set, b takes everything.
    mesh.write_config(&two_endpoint_config(false)).unwrap();
    mesh.wait_config(RELOAD, |dump| dump.contains("Unhealthy"))
        .await
        .unwrap();
    for i in 0..N {
        echo_once(&a, echo_vip(), 100 + i as u64).await;
    }
    let after = settle_counts(&[&b, &d], 2 * N).await;
    assert_eq!(
        after[1] - nd,
        0,
        "the Unhealthy endpoint d still received connections (b {} → {}, d {nd} → {})",
        nb,
        after[0],
        after[1]
    );
    assert_eq!(
        after[0] - nb,
        N,
        "b must receive every connection once d is Unhealthy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_port_mapping_is_honoured() {
    const N: usize = 6;
    // Service port 8080 → targetPort 9000. b overrides it to 9100 in its own `services` map;
    // d names the service without a port entry, so the service's targetPort (9000) applies.
    let config = MeshConfig::new()
        .workload(Workload::hbone("a", "10.244.1.2", "n1"))
        .workload(Workload::hbone("c", "10.244.1.3", "n1"))
        .workload(Workload::hbone("b", "10.244.2.2", "n2"))
        .workload(Workload::hbone("d", "10.244.2.3", "n2"))
        .service(Service::new("echo", &ECHO_VIP.to_string()).port(ECHO_PORT, 9000))
        .endpoint_ports("b", "echo", &[(ECHO_PORT, 9100)])
        .endpoint_ports("d", "echo", &[]);
    let mesh = Mesh::two_nodes("target-port", &config).await.unwrap();
    let b_9100 = echo_server(&mesh.pod("b").ns, any(9100)).unwrap();
    let b_9000 = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let d_9000 = echo_server(&mesh.pod("d").ns, any(9000)).unwrap();
    let d_9100 = echo_server(&mesh.pod("d").ns, any(9100)).unwrap();
    let d_8080 = echo_server(&mesh.pod("d").ns, any(ECHO_PORT)).unwrap();
    let b_8080 = echo_server(&mesh.pod("b").ns, any(ECHO_PORT)).unwrap();
    let a = mesh.pod("a").ns.handle();

    for i in 0..N {
        echo_once(&a, echo_vip(), i as u64).await;
    }
    let c = settle_counts(&[&b_9100, &d_9000, &b_9000, &d_9100, &b_8080, &d_8080], N).await;
    assert_eq!(
        c[2..],
        [0, 0, 0, 0],
        "wrong ports reached (b:9000, d:9100, b:8080, d:8080): {c:?}"
    );
    assert!(
        c[0] > 0,
        "b's own targetPort override (9100) was not used: b:9100 {}, d:9000 {}",
        c[0],
        c[1]
    );
    assert!(
        c[1] > 0,
        "d did not get the service's targetPort (9000): b:9100 {}, d:9000 {}",
        c[0],
        c[1]
    );
    assert_eq!(c[0] + c[1], N, "{c:?}");
    // n2's ztunnel delivered each tunnelled stream to the mapped port.
    for dst in ["dst=10.244.2.2:9100", "dst=10.244.2.3:9000"] {
        mesh.ztunnel("n2")
            .wait_log_line(
                &["chain=\"inbound_hbone\"", "src=10.244.1.2:", dst],
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_pod_ip_across_nodes_is_tunnelled() {
    let mesh = Mesh::two_nodes("direct-pod", &standard_config())
        .await
        .unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let n1 = mesh.node("n1");
    let capture = Capture::start(&n1.ns, &n1.link_if, &mesh.dir.join("link.pcap")).unwrap();

    let pattern = b"DIRECT-POD-IP-CANARY-5e21b7";
    let stream = mesh
        .pod("a")
        .ns
        .connect(addr("10.244.2.2:9000"))
        .await
        .unwrap();
    let t = within(60, "a → b pod IP", echo_pattern(stream, 1 << 20, pattern))
        .await
        .unwrap();
    assert!(t.echoed_intact(), "{t:?}");
    let rec = &server
        .wait_records(1, Duration::from_secs(10))
        .await
        .unwrap()[0];
    assert_eq!(rec.peer.ip(), POD_A, "b must see a's pod IP");
    assert_eq!(rec.bytes, 1 << 20);

    let line = mesh
        .ztunnel("n1")
        .wait_log_line(
            &["src=10.244.1.2:", "dst=10.244.2.2:9000"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(
        line.contains("chain=\"outbound_hbone\"") && line.contains("upstream=10.244.2.2:15008"),
        "a pod IP on another node must be tunnelled to its node: {line}"
    );

    let pcap = capture.stop().unwrap();
    assert_eq!(pcap.dropped, 0, "capture incomplete: {}", pcap.summary);
    assert!(
        pcap.tcp_payload_bytes() >= 2 * (1 << 20),
        "the flow did not cross the captured link ({} payload bytes)",
        pcap.tcp_payload_bytes()
    );
    assert!(!pcap.contains(pattern), "plaintext seen on the node link");
    assert_eq!(
        pcap.tcp_dst_ports()
            .into_iter()
            .filter(|p| *p == 9000)
            .count(),
        0,
        "TCP to port 9000 crossed the node link: the pod IP was not tunnelled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_protocol_workload_gets_plain_tcp() {
    // d is known to the mesh but speaks plain TCP (not captured on n2).
    let config = standard_config().workload(Workload::hbone("d", "10.244.2.3", "n2").tcp());
    let mesh = Mesh::two_nodes("tcp-workload", &config).await.unwrap();
    let server = echo_server(&mesh.pod("d").ns, any(9000)).unwrap();
    let n1 = mesh.node("n1");
    let capture = Capture::start(&n1.ns, &n1.link_if, &mesh.dir.join("link.pcap")).unwrap();

    let pattern = b"PLAIN-TCP-WORKLOAD-CANARY-91c4e0";
    let stream = mesh
        .pod("a")
        .ns
        .connect(addr("10.244.2.3:9000"))
        .await
        .unwrap();
    let t = within(60, "a → d", echo_pattern(stream, 256 << 10, pattern))
        .await
        .unwrap();
    assert!(t.echoed_intact(), "{t:?}");
    server
        .wait_records(1, Duration::from_secs(10))
        .await
        .unwrap();

    let line = mesh
        .ztunnel("n1")
        .wait_log_line(
            &["src=10.244.1.2:", "dst=10.244.2.3:9000"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(
        line.contains("chain=\"outbound_tcp\"") && line.contains("upstream=10.244.2.3:9000"),
        "a protocol TCP workload must get plain TCP: {line}"
    );

    let pcap = capture.stop().unwrap();
    assert_eq!(pcap.dropped, 0, "capture incomplete: {}", pcap.summary);
    assert!(
        pcap.contains(pattern),
        "the plaintext payload did not cross the node link (was it tunnelled?)"
    );
    assert!(
        pcap.tcp().any(|p| p.dst == Ipv4Addr::new(10, 244, 2, 3)
            && p.dst_port == 9000
            && p.payload_len > 0),
        "no payload to 10.244.2.3:9000 on the node link; ports seen: {:?}",
        pcap.tcp_dst_ports()
    );
    assert!(
        !pcap.tcp_dst_ports().contains(&15008),
        "an HBONE tunnel was opened for a protocol TCP workload"
    );
    assert_eq!(
        mesh.ztunnel("n1").hbone_connections_opened().await.unwrap(),
        0,
        "n1 opened HBONE connections although only a TCP workload was contacted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_can_still_reach_local_mesh_pod() {
    let mesh = Mesh::two_nodes("node-to-pod", &standard_config())
        .await
        .unwrap();
    let b = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let a = echo_server(&mesh.pod("a").ns, any(9000)).unwrap();

    // Capture is active on both nodes: a → VIP is captured on n1 and tunnelled into b on n2.
    let before = echo_once(&mesh.pod("a").ns, echo_vip(), 1).await;
    assert!(before.echoed_intact());
    mesh.ztunnel("n1")
        .wait_log_line(
            &["chain=\"outbound_hbone\"", "dst=10.96.0.10:8080"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    b.wait_records(1, Duration::from_secs(5)).await.unwrap();

    // The kubelet-probe path: the node itself connects to its own mesh pod.
    for (node, pod, server) in [("n2", "b", &b), ("n1", "a", &a)] {
        let node = mesh.node(node);
        let pod_ip = mesh.pod(pod).ip;
        let dst = SocketAddr::new(pod_ip.into(), 9000);
        let seen = server.records().len();
        for attempt in 0..3 {
            let outcome = probe_echo(&node.ns, dst, Duration::from_secs(5)).await;
            assert_eq!(
                outcome,
                Outcome::Echoed,
                "node {} → its pod {pod} ({dst}), attempt {attempt}",
                node.name
            );
        }
        let stream = within(10, "node connect", node.ns.connect(dst))
            .await
            .unwrap();
        let t = within(60, "node → pod echo", echo_random(stream, 1 << 20, 7))
            .await
            .unwrap();
        assert!(t.echoed_intact(), "node {} → {dst}: {t:?}", node.name);
        let records = server
            .wait_records(seen + 4, Duration::from_secs(5))
            .await
            .unwrap();
        let node_addrs: [IpAddr; 2] = [node.gateway().into(), node.ip.into()];
        for r in &records[seen..] {
            assert!(
                node_addrs.contains(&r.peer.ip()),
                "pod {pod} saw {} instead of its node's address",
                r.peer
            );
        }
    }

    // And the mesh path still works afterwards.
    echo_once(&mesh.pod("a").ns, echo_vip(), 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_are_reused() {
    const SEQUENTIAL: usize = 200;
    const CONCURRENT: usize = 300;
    const MAX_STREAMS: usize = 100;
    raise_nofile_limit(65536).unwrap();
    // parallel_connections is the number of CPUs (2 here); ztunnel runs on the same machine.
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let mesh = Mesh::two_nodes("pool-reuse", &standard_config())
        .await
        .unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let a = mesh.pod("a").ns.handle();
    let n1 = mesh.ztunnel("n1");
    assert_eq!(n1.hbone_connections_opened().await.unwrap(), 0);

    for i in 0..SEQUENTIAL {
        echo_once(&a, echo_vip(), i as u64).await;
    }
    server
        .wait_records(SEQUENTIAL, Duration::from_secs(10))
        .await
        .unwrap();
    let sequential_opened = n1.hbone_connections_opened().await.unwrap();
    assert!(
        sequential_opened >= 1,
        "the connections did not go through n1's HBONE pool"
    );
    assert!(
        sequential_opened <= parallel,
        "{SEQUENTIAL} sequential tunnelled connections opened {sequential_opened} HBONE connections \
         (at most parallel_connections = {parallel} expected: streams must reuse pooled connections)"
    );

    // All CONCURRENT connections are open (and have carried data) at the same time.
    let sockets = a.tcp_sockets(CONCURRENT).unwrap();
    let connecting = Arc::new(tokio::sync::Semaphore::new(100));
    let all_open = Arc::new(tokio::sync::Barrier::new(CONCURRENT));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let (connecting, all_open) = (connecting.clone(), all_open.clone());
        tasks.spawn(async move {
            let data = random_bytes(1024, 5000 + i as u64);
            let permit = connecting.acquire().await.unwrap();
            let mut stream = socket.connect(echo_vip()).await?;
            drop(permit);
            echo_roundtrip(&mut stream, &data).await?;
            all_open.wait().await;
            stream.shutdown().await?;
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await?;
            anyhow::ensure!(rest.is_empty(), "extra bytes after the echo");
            anyhow::Ok(())
        });
    }
    within(180, "concurrent connections", async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap().expect("concurrent connection failed");
        }
    })
    .await;
    server
        .wait_records(SEQUENTIAL + CONCURRENT, Duration::from_secs(30))
        .await
        .unwrap();
    let total = n1.hbone_connections_opened().await.unwrap();
    let concurrent_opened = total - sequential_opened;
    let limit = CONCURRENT.div_ceil(MAX_STREAMS) as u64 + parallel;
    assert!(
        concurrent_opened <= limit,
        "{CONCURRENT} concurrent connections opened {concurrent_opened} more HBONE connections \
         (at most {limit} expected with {MAX_STREAMS} streams per connection)"
    );
    assert!(
        total >= CONCURRENT.div_ceil(MAX_STREAMS) as u64,
        "{CONCURRENT} concurrent streams fit on {total} HBONE connections: more than \
         {MAX_STREAMS} streams per pooled connection"
    );
    assert_eq!(server.peer_ips(), vec![POD_A]);
}
