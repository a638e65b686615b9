//! Checks of the harness itself, without ztunnel: topologies route plain TCP, the in-namespace
//! runners work, the capture sees plaintext when there is some, and teardown leaves nothing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tests::apps::{echo_pattern, echo_random, echo_server, hash_server, send_to_hash_server};
use tests::capture::Capture;
use tests::netns::list_namespaces;
use tests::testdir::TestDir;
use tests::topology::Topology;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_selftest() {
    let names = {
        let topo = Topology::two_nodes().expect("building topology");
        let names = topo.namespace_names();
        assert_eq!(names.len(), 6);
        for n in &names {
            assert!(list_namespaces().unwrap().contains(n), "{n} not created");
        }

        // Cross-node: a → b directly (no mesh), both directions intact, real source IP.
        let server = echo_server(&topo.pod("b").ns, addr("0.0.0.0:9000")).unwrap();
        let stream = topo
            .pod("a")
            .ns
            .connect(addr("10.244.2.2:9000"))
            .await
            .unwrap();
        let t = echo_random(stream, 4 << 20, 7).await.unwrap();
        assert!(t.echoed_intact(), "{t:?}");
        let recs = server
            .wait_records(1, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(recs[0].peer.ip(), IpAddr::from([10, 244, 1, 2]));
        assert_eq!(recs[0].sha256, t.sent_sha256);

        // Same node: a → c, through the hash server.
        let _sink = hash_server(&topo.pod("c").ns, addr("0.0.0.0:9000")).unwrap();
        let stream = topo
            .pod("a")
            .ns
            .connect(addr("10.244.1.3:9000"))
            .await
            .unwrap();
        let reply = send_to_hash_server(stream, 1 << 20, 3).await.unwrap();
        assert_eq!(reply.peer.ip(), IpAddr::from([10, 244, 1, 2]));

        // Node → remote pod, and node → node.
        let stream = topo
            .node("n1")
            .ns
            .connect(addr("10.244.2.2:9000"))
            .await
            .unwrap();
        assert!(echo_random(stream, 1000, 1).await.unwrap().echoed_intact());

        // The in-namespace runners: a future on its own runtime inside pod a.
        let out = topo
            .pod("a")
            .ns
            .run(|| async {
                let s = tokio::net::TcpStream::connect("10.244.2.2:9000").await?;
                anyhow::Ok(s.local_addr()?.ip())
            })
            .unwrap()
            .unwrap();
        assert_eq!(out, IpAddr::from(Ipv4Addr::new(10, 244, 1, 2)));
        let task = topo
            .pod("d")
            .ns
            .spawn(|| async {
                let s = tokio::net::TcpStream::connect("10.244.2.2:9000").await?;
                anyhow::Ok(s.local_addr()?.ip())
            })
            .unwrap();
        assert_eq!(
            task.join().await.unwrap().unwrap(),
            IpAddr::from([10, 244, 2, 3])
        );
        let ip_out = topo.pod("b").ns.exec(&["ip", "-4", "addr", "show", "eth0"]);
        assert!(ip_out.unwrap().contains("10.244.2.2/32"));
        let err = topo.pod("b").ns.exec(&["false"]).unwrap_err();
        assert!(format!("{err:#}").contains("false"), "{err:#}");
        names
    };
    let left = list_namespaces().unwrap();
    for n in names {
        assert!(!left.contains(&n), "namespace {n} left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_sees_plaintext_when_unprotected() {
    let topo = Topology::two_nodes().unwrap();
    let dir = TestDir::new("capture-selftest").unwrap();
    let _server = echo_server(&topo.pod("b").ns, addr("0.0.0.0:9000")).unwrap();
    let n1 = topo.node("n1");
    let cap = Capture::start(&n1.ns, &n1.link_if, &dir.join("link.pcap")).unwrap();
    let pattern = b"PLAINTEXT-CANARY-do-not-leak";
    let stream = topo
        .pod("a")
        .ns
        .connect(addr("10.244.2.2:9000"))
        .await
        .unwrap();
    let t = echo_pattern(stream, 256 << 10, pattern).await.unwrap();
    assert!(t.echoed_intact());
    let pcap = cap.stop().unwrap();
    assert!(pcap.contains(pattern), "capture missed the plaintext");
    assert!(pcap.tcp_dst_ports().contains(&9000));
    assert!(
        pcap.tcp_payload_bytes() >= 2 * (256 << 10),
        "records {} packets {} payload {}; {}",
        pcap.records,
        pcap.packets.len(),
        pcap.tcp_payload_bytes(),
        pcap.summary
    );
}

#[test]
fn topology_is_torn_down_on_panic() {
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::builder().node("n1", &["a", "e"]).build().unwrap();
        *names.lock().unwrap() = topo.namespace_names();
        panic!("test failure while the topology is up");
    }));
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 3);
    let left = list_namespaces().unwrap();
    for n in names {
        assert!(!left.contains(&n), "namespace {n} left behind after panic");
    }
}
