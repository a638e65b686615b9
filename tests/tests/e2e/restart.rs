//! Restarts and upgrades of a node's ztunnel under traffic (issue 9 item 13). A crash
//! (`kill -9`) leaves the capture installed: while no ztunnel runs, no packet of a mesh pod
//! leaves the node in plaintext (an nft counter on the node's uplink and a packet capture both
//! see none), and a ztunnel started again with the same arguments takes the rules over and
//! serves, with no manual cleanup. An upgrade starts the new ztunnel beside the old one
//! (`SO_REUSEPORT`): a client opening connections all along sees none refused, and a live
//! connection through the old one finishes while it drains.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use tests::apps::{echo_roundtrip, echo_server, random_bytes};
use tests::capture::Capture;
use tests::mesh::{echo_vip, standard_config, Mesh};
use tests::support::{addr, any, within};
use tests::topology::Node;
use tests::tproxy::CaptureState;
use tests::traffic::{LeakWatch, Load, MARKER};
use tests::ztunnel::ZtunnelProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The standard mesh's pods per node, as the leak counters want them.
fn mesh_ips(node: &str) -> Vec<Ipv4Addr> {
    match node {
        "n1" => vec![Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 3)],
        _ => vec![Ipv4Addr::new(10, 244, 2, 2)],
    }
}

/// On each node's uplink, a plaintext-leak counter and a packet capture.
fn watch_uplinks(mesh: &Mesh) -> (Vec<(String, LeakWatch)>, Vec<Capture>) {
    let watches = ["n1", "n2"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                LeakWatch::install(mesh.node(n), &mesh_ips(n)),
            )
        })
        .collect();
    let caps = ["n1", "n2"]
        .iter()
        .map(|n| {
            let node = mesh.node(n);
            let file = mesh.dir.join(&format!("{n}-{}.pcap", node.link_if));
            Capture::start(&node.ns, &node.link_if, &file).unwrap()
        })
        .collect();
    (watches, caps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_traffic_leaks_nothing_and_a_restart_serves() {
    let config = standard_config();
    let mut mesh = Mesh::two_nodes("restart-kill9", &config).await.unwrap();
    let _server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let (watches, caps) = watch_uplinks(&mesh);
    // The pod IP target is reachable in plaintext if anything bypassed the capture (n2 admits
    // plaintext); the VIP only through a ztunnel.
    let load = Load::start(
        &mesh.pod("a").ns,
        &[addr("10.244.2.2:9000"), echo_vip()],
        true,
        Duration::from_secs(1),
    );
    load.wait_ok(0, 50, Duration::from_secs(20), "traffic before any kill")
        .await;

    for node in ["n1", "n2"] {
        let ns = mesh.node(node).ns.handle();
        let before = CaptureState::read(&ns).unwrap();
        assert!(before.is_installed_once(), "{node}: {before:?}");
        mesh.ztunnel_mut(node).kill9().await.unwrap();
        let killed_at = Instant::now();
        // Exchanges finishing right at the kill are not evidence; after that nothing may get
        // through while no ztunnel runs on the path.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ok_at_gap = load.tally.ok();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            load.tally.ok(),
            ok_at_gap,
            "traffic got through while {node}'s ztunnel was dead: it bypassed the mesh"
        );
        let left = CaptureState::read(&ns).unwrap();
        assert!(
            left.is_installed_once() && left.ruleset == before.ruleset,
            "{node}: the capture did not stay as it was after kill -9: {left:?}"
        );

        // Started again with the same arguments over the leftover table: no cleanup needed.
        let opts = mesh.opts_for(mesh.node(node), &config);
        let log = mesh.dir.join(&format!("ztunnel-{node}-restarted.log"));
        let zt = ZtunnelProcess::start(&ns, &opts, &log).await.unwrap();
        let slot = mesh.ztunnels.iter().position(|z| z.node == node).unwrap();
        mesh.ztunnels[slot] = zt;
        let taken_over = CaptureState::read(&ns).unwrap();
        assert!(
            taken_over.is_installed_once() && taken_over.ruleset == before.ruleset,
            "{node}: after the restart, not one identical table: {taken_over:?}"
        );
        let served_from = load.tally.ok();
        load.wait_ok(
            served_from,
            30,
            Duration::from_secs(15),
            &format!("traffic after restarting {node}"),
        )
        .await;
        eprintln!(
            "{node}: killed, restarted and serving again {:?} after the kill",
            killed_at.elapsed()
        );
    }
    let tally = load.stop().await;
    eprintln!(
        "exchanges ok {}, failed {} (connections broken by the kills)",
        tally.ok(),
        tally.failed()
    );

    for (node, watch) in &watches {
        let plain = watch.packets("plaintext");
        let hbone = watch.packets("hbone") + watch.packets("hbone-reply");
        eprintln!("{node} uplink: {plain} plaintext mesh packets, {hbone} HBONE packets");
        assert!(
            hbone > 0,
            "{node}: the counter saw no tunnel traffic at all"
        );
        assert_eq!(plain, 0, "{node}: mesh pod packets left in plaintext");
    }
    for (cap, node) in caps.into_iter().zip(["n1", "n2"]) {
        let pcap = cap.stop().unwrap();
        assert!(pcap.tcp().count() > 0, "{node}: empty capture");
        assert!(
            !pcap.contains(MARKER),
            "{node}: the pods' plaintext payload was seen on the uplink"
        );
    }
}

/// The sharpest case of a dead ztunnel: a connection it carried outlives it. When ztunnel is
/// killed with nothing unread, the kernel closes its sockets with a FIN; both pods keep their
/// (half-closed) connection, and once ztunnel's orphaned sockets are gone, whatever either pod
/// sends on it matches no socket. Forwarded, that would cross the uplink in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_outliving_its_ztunnel_never_leaks() {
    let mut mesh = Mesh::two_nodes("restart-orphan", &standard_config())
        .await
        .unwrap();
    let listener = mesh.pod("b").ns.tcp_listener(any(9100)).unwrap();
    let a = mesh.pod("a").ns.handle();
    let (mut client, (mut server, _)) = tokio::join!(
        async { a.connect(addr("10.244.2.2:9100")).await.unwrap() },
        async { listener.accept().await.unwrap() }
    );
    client.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    within(10, "hello through the mesh", server.read_exact(&mut buf))
        .await
        .unwrap();
    let (watches, caps) = watch_uplinks(&mesh);
    for node in ["n1", "n2"] {
        // Orphaned sockets in FIN_WAIT2 live this long (default 60 s).
        mesh.node(node)
            .ns
            .sysctl("net.ipv4.tcp_fin_timeout", "1")
            .unwrap();
        mesh.ztunnel_mut(node).kill9().await.unwrap();
    }
    // Both pods see their peer's FIN (ztunnel's sockets closing) …
    let mut rest = Vec::new();
    within(10, "EOF at the client", client.read_to_end(&mut rest))
        .await
        .unwrap();
    within(10, "EOF at the server", server.read_to_end(&mut rest))
        .await
        .unwrap();
    // … and once ztunnel's orphans are gone, each sends on its half of the connection.
    tokio::time::sleep(Duration::from_secs(4)).await;
    // (A write may fail: a socket ztunnel left behind can still answer with a reset, which
    // is local and fine. What matters is where the segments go.)
    let mut sent = [0usize; 2];
    for _ in 0..5 {
        for (i, s) in [&mut client, &mut server].into_iter().enumerate() {
            if s.write_all(MARKER).await.is_ok() {
                sent[i] += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "writes accepted after the kill: client {}, server {}",
        sent[0], sent[1]
    );
    assert!(
        sent[0] > 0 || sent[1] > 0,
        "no pod could send at all: the test proves nothing"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (node, watch) in &watches {
        assert_eq!(
            watch.packets("plaintext"),
            0,
            "{node}: a pod's segments left the node in plaintext"
        );
    }
    for (cap, node) in caps.into_iter().zip(["n1", "n2"]) {
        let pcap = cap.stop().unwrap();
        assert!(
            !pcap.contains(MARKER),
            "{node}: a pod's plaintext payload crossed the uplink"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_runs_old_and_new_side_by_side_without_refusing_connections() {
    let config = standard_config();
    let drain = |_: &Node, opts: &mut tests::ztunnel::ZtunnelOpts| {
        opts.extra_args
            .extend(["--drain-timeout", "20s"].map(String::from));
    };
    let mut mesh = Mesh::two_nodes_with("restart-upgrade", &config, drain)
        .await
        .unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let n1 = mesh.node("n1").ns.handle();
    let a = mesh.pod("a").ns.handle();

    // Connections queued on the old listeners when they close move to the new ones.
    let migrate = n1
        .exec(&["sysctl", "-n", "net.ipv4.tcp_migrate_req"])
        .unwrap();
    assert_eq!(
        migrate.trim(),
        "1",
        "ztunnel did not enable tcp_migrate_req"
    );

    let mut live = a.connect(echo_vip()).await.unwrap();
    within(
        10,
        "echo through the old ztunnel",
        echo_roundtrip(&mut live, b"old"),
    )
    .await
    .unwrap();
    // New connections all along; 3 s allows one retransmitted SYN, which this test does not
    // expect either: any failure counts.
    let load = Load::start(
        &a,
        &[echo_vip(), addr("10.244.2.2:9000")],
        false,
        Duration::from_secs(3),
    );
    load.wait_ok(
        0,
        20,
        Duration::from_secs(10),
        "traffic through the old ztunnel",
    )
    .await;

    // The new ztunnel binds the same ports while the old one serves.
    let mut opts = mesh.opts_for(mesh.node("n1"), &config);
    drain(mesh.node("n1"), &mut opts);
    let log = mesh.dir.join("ztunnel-n1-new.log");
    let new = ZtunnelProcess::start_beside(&n1, &opts, &log)
        .await
        .unwrap();
    let completed = |zt: &ZtunnelProcess| zt.log().matches("connection complete").count();
    let old_before = completed(mesh.ztunnel("n1"));
    let overlap_from = load.tally.ok();
    load.wait_ok(
        overlap_from,
        40,
        Duration::from_secs(10),
        "traffic with both running",
    )
    .await;
    // The kernel spreads new connections over both listeners.
    new.wait_log_line(&["connection complete"], Duration::from_secs(10))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while completed(mesh.ztunnel("n1")) == old_before {
        assert!(
            Instant::now() < deadline,
            "the old ztunnel served nothing once the new one listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "overlap: old served {}, new served {} connections so far",
        completed(mesh.ztunnel("n1")) - old_before,
        completed(&new)
    );

    let old = mesh.ztunnel_mut("n1");
    old.sigterm().unwrap();
    let sigterm_at = Instant::now();
    let after_sigterm = load.tally.ok();
    load.wait_ok(
        after_sigterm,
        40,
        Duration::from_secs(10),
        "traffic while the old one drains",
    )
    .await;
    assert!(
        old.is_running(),
        "the old ztunnel left with a live connection"
    );

    // The live connection through the old ztunnel finishes.
    within(
        10,
        "echo on the old ztunnel's live connection during its drain",
        echo_roundtrip(&mut live, &random_bytes(256 << 10, 5)),
    )
    .await
    .expect("the live connection broke during the upgrade");
    live.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(
        10,
        "EOF of the live connection",
        live.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    assert!(rest.is_empty());
    let status = old.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "old ztunnel exit status {status}");
    eprintln!(
        "old ztunnel drained and exited {:?} after SIGTERM",
        sigterm_at.elapsed()
    );

    let only_new = load.tally.ok();
    load.wait_ok(
        only_new,
        40,
        Duration::from_secs(10),
        "traffic through the new ztunnel alone",
    )
    .await;
    let tally = load.stop().await;
    assert_eq!(
        tally.failed(),
        0,
        "connections failed during the upgrade ({} ok): {:?}",
        tally.ok(),
        tally.failures.lock().unwrap()
    );
    // The new one owns the one capture table.
    let state = CaptureState::read(&n1).unwrap();
    assert!(state.is_installed_once(), "after the upgrade: {state:?}");
    let slot = mesh.ztunnels.iter().position(|z| z.node == "n1").unwrap();
    mesh.ztunnels[slot] = new;
    let whole = 3 + (256 << 10);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.records().iter().any(|r| r.bytes == whole) {
        assert!(
            Instant::now() < deadline,
            "the server never saw the whole live connection ({whole} bytes)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("upgrade: {} new connections, none failed", tally.ok());
}
