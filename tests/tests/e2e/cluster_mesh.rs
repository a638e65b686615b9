//! The mesh run the way a cluster runs it: everything the ztunnels know comes from Kubernetes
//! objects (in the fake API server) through the real controller — workloads and services over
//! delta xDS, workload certificates from the controller's CA for a node-bound token, capture
//! following the mesh. Real TPROXY, real mTLS, real traffic in the two-node netns topology.

use std::net::IpAddr;
use std::time::{Duration, Instant};
use tests::apps::{echo_server, probe_echo, Outcome};
use tests::cluster::{echo_app, endpoint_slice, pod, ClusterMesh};
use tests::mesh::echo_vip;
use tests::support::any;

/// Probes until the outcome is `Echoed` or `deadline` passes; returns the last outcome.
async fn echo_eventually(ns: &tests::netns::Netns, deadline: Duration) -> Outcome {
    let end = Instant::now() + deadline;
    loop {
        let o = probe_echo(ns, echo_vip(), Duration::from_secs(3)).await;
        if matches!(o, Outcome::Echoed) || Instant::now() > end {
            return o;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_objects_drive_the_mesh_through_the_controller() {
    let mesh = ClusterMesh::start("cluster-mesh", echo_app())
        .await
        .unwrap();
    let echo = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();

    // a → the echo Service VIP: captured on n1, HBONE with a certificate the controller
    // signed for sa-a, delivered by n2's ztunnel with a's own address.
    let o = echo_eventually(&mesh.pod("a").ns, Duration::from_secs(20)).await;
    assert!(matches!(o, Outcome::Echoed), "a → echo: {o:?}");
    echo.wait_records(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(echo.peer_ips(), vec![IpAddr::from([10, 244, 1, 2])]);
    mesh.ztunnel("n2")
        .wait_log_line(
            &["inbound_hbone", "src=10.244.1.2:", "sa/sa-a"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();

    // Both ztunnels are xDS clients of the controller.
    let m = mesh.controller.metrics().await.unwrap();
    assert!(
        m.lines()
            .any(|l| l.starts_with("xds_connected_clients") && l.ends_with(" 2")),
        "{m}"
    );

    // A new pod appears on n1: the controller names it, n1's ztunnel captures it and gets
    // its certificate, and its traffic is tunnelled with its own identity.
    mesh.create(pod(
        "default",
        "c",
        "sa-c",
        "n1",
        "10.244.1.3",
        &[("app", "other")],
    ))
    .unwrap();
    let o = echo_eventually(&mesh.pod("c").ns, Duration::from_secs(20)).await;
    assert!(matches!(o, Outcome::Echoed), "c → echo: {o:?}");
    mesh.ztunnel("n2")
        .wait_log_line(
            &["inbound_hbone", "src=10.244.1.3:", "sa/sa-c"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();

    // The last endpoint goes away: a's next connection fails fast instead of hanging, and
    // nothing reaches b.
    mesh.update(endpoint_slice("default", "echo", 9000, &[]))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(15);
    let outcome = loop {
        let started = Instant::now();
        let o = probe_echo(&mesh.pod("a").ns, echo_vip(), Duration::from_secs(5)).await;
        if !matches!(o, Outcome::Echoed) {
            break (o, started.elapsed());
        }
        assert!(
            Instant::now() < end,
            "echo still reachable 15 s after its endpoints left"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        matches!(
            outcome.0,
            Outcome::Reset | Outcome::Refused | Outcome::ClosedWithoutData
        ),
        "{outcome:?}"
    );
    assert!(
        outcome.1 < Duration::from_secs(3),
        "not fail-fast: {outcome:?}"
    );
    let settled = echo.records().len();
    let again = probe_echo(&mesh.pod("a").ns, echo_vip(), Duration::from_secs(5)).await;
    assert!(!matches!(again, Outcome::Echoed), "{again:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        echo.records().len(),
        settled,
        "b still receives connections"
    );
}
