//! The life of a ztunnel process around the traffic it carries: certificates rotating under live
//! connections, and a SIGTERM that drains live connections, fails closed for new ones, and
//! leaves the capture rules installed on exit (fail closed until the next ztunnel; removed only
//! with `--remove-capture-on-exit`). Restarts and upgrades are in `restart.rs`.

use std::time::{Duration, Instant};
use tests::apps::{echo_random, echo_roundtrip, echo_server, probe_echo, random_bytes, Outcome};
use tests::mesh::{echo_vip, standard_config, Mesh};
use tests::support::{addr, any, within};
use tests::tproxy::CaptureState;
use tests::ztunnel::ZtunnelProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `(generation, expiresInSeconds)` of `identity`'s certificate in a ztunnel's `/config_dump`.
async fn certificate(zt: &ZtunnelProcess, identity: &str) -> (u64, u64) {
    let dump: serde_json::Value = serde_json::from_str(&zt.config_dump().await.unwrap()).unwrap();
    let certs = dump["certificates"]
        .as_array()
        .unwrap_or_else(|| panic!("no certificates array in config_dump:\n{dump:#}"));
    let cert = certs
        .iter()
        .find(|c| c["identity"] == identity)
        .unwrap_or_else(|| panic!("no certificate for {identity} on {}: {certs:?}", zt.node));
    (
        cert["generation"].as_u64().expect("generation"),
        cert["expiresInSeconds"].as_u64().expect("expiresInSeconds"),
    )
}

/// `hbonePool.connectionsOpened` of a ztunnel.
async fn hbone_connections_opened(zt: &ZtunnelProcess) -> u64 {
    let dump: serde_json::Value = serde_json::from_str(&zt.config_dump().await.unwrap()).unwrap();
    dump["hbonePool"]["connectionsOpened"]
        .as_u64()
        .unwrap_or_else(|| panic!("no hbonePool.connectionsOpened in config_dump:\n{dump:#}"))
}

/// Polls the certificate of `identity` until it has been replaced `rotations` times after
/// `first` (the generation seen first), returning every generation seen.
async fn wait_rotations(
    zt: &ZtunnelProcess,
    identity: &str,
    first: u64,
    rotations: usize,
    timeout: Duration,
) -> Vec<u64> {
    let deadline = Instant::now() + timeout;
    let mut seen = vec![first];
    while seen.len() <= rotations {
        let (generation, _) = certificate(zt, identity).await;
        if generation != *seen.last().unwrap() {
            assert!(
                generation > *seen.last().unwrap(),
                "certificate generation of {identity} went backwards: {seen:?} then {generation}"
            );
            seen.push(generation);
        }
        assert!(
            Instant::now() < deadline,
            "{identity} on {}: only generations {seen:?} within {timeout:?}, expected {rotations} rotations; log tail:\n{}",
            zt.node,
            zt.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_keeps_live_connections() {
    const TTL: Duration = Duration::from_secs(2);
    let config = standard_config();
    let a_id = config.get_workload("a").unwrap().spiffe_id();
    let b_id = config.get_workload("b").unwrap().spiffe_id();
    let mesh = Mesh::two_nodes_with("cert-rotation", &config, |_, opts| {
        opts.extra_args.extend(["--cert-ttl".into(), "2s".into()]);
    })
    .await
    .unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let (n1, n2) = (mesh.ztunnel("n1"), mesh.ztunnel("n2"));

    // The live connection, established with the certificates of this moment.
    let mut old = mesh.pod("a").ns.connect(echo_vip()).await.unwrap();
    let established = Instant::now();
    within(
        10,
        "first echo",
        echo_roundtrip(&mut old, &random_bytes(64 << 10, 1)),
    )
    .await
    .unwrap();
    let (a_gen, a_expires) = certificate(n1, &a_id).await;
    let (b_gen, _) = certificate(n2, &b_id).await;
    assert!(
        a_expires <= TTL.as_secs(),
        "--cert-ttl 2s not applied: {a_id} expires in {a_expires} s"
    );
    let opened_before = hbone_connections_opened(n1).await;

    // Both ends rotate (at least twice) with no new connection asking for a certificate.
    let a_gens = wait_rotations(n1, &a_id, a_gen, 2, Duration::from_secs(20)).await;
    let b_gens = wait_rotations(n2, &b_id, b_gen, 2, Duration::from_secs(20)).await;
    eprintln!("generations: {a_id} {a_gens:?}, {b_id} {b_gens:?}");
    // …and the certificates the live connection was established with have expired by now.
    let outlive = (TTL + Duration::from_secs(1)).saturating_sub(established.elapsed());
    tokio::time::sleep(outlive).await;

    within(
        10,
        "echo on the connection opened before rotation",
        echo_roundtrip(&mut old, &random_bytes(256 << 10, 2)),
    )
    .await
    .expect("the live connection broke across certificate rotation");

    // A new connection after rotation works, over a new HBONE connection made with the new
    // certificate (the pool does not reuse connections of an older certificate).
    let new = mesh.pod("a").ns.connect(echo_vip()).await.unwrap();
    let t = within(30, "echo on a new connection", echo_random(new, 1 << 20, 3))
        .await
        .unwrap();
    assert!(t.echoed_intact(), "new connection after rotation: {t:?}");
    let opened_after = hbone_connections_opened(n1).await;
    assert!(
        opened_after > opened_before,
        "no new HBONE connection with the rotated certificate (connectionsOpened {opened_before} → {opened_after})"
    );

    // The old connection is still fine after all that, and closes cleanly.
    within(
        10,
        "echo on the old connection, again",
        echo_roundtrip(&mut old, b"still here after rotation"),
    )
    .await
    .unwrap();
    old.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(10, "old connection EOF", old.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty(), "extra bytes after the echo");
    let records = server
        .wait_records(2, Duration::from_secs(10))
        .await
        .unwrap();
    let total: u64 = records.iter().map(|r| r.bytes).sum();
    assert_eq!(
        total,
        (64 << 10) + (256 << 10) + (1 << 20) + b"still here after rotation".len() as u64,
        "the server did not receive every byte: {records:?}"
    );
}

/// The standard two-node mesh where `node`'s ztunnel drains for `drain` on SIGTERM.
async fn mesh_draining(label: &str, node: &str, drain: Duration) -> Mesh {
    Mesh::two_nodes_with(label, &standard_config(), |n, opts| {
        if n.name == node {
            opts.extra_args
                .extend(["--drain-timeout".into(), format!("{}s", drain.as_secs())]);
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_live_connections_then_keeps_rules() {
    const DRAIN: Duration = Duration::from_secs(20);
    let mut mesh = mesh_draining("sigterm-drain", "n1", DRAIN).await;
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let n1_ns = mesh.node("n1").ns.handle();
    let a = mesh.pod("a").ns.handle();
    let before = CaptureState::read(&n1_ns).unwrap();
    assert!(
        before.is_installed_once(),
        "capture not installed: {before:?}"
    );

    let mut live = a.connect(echo_vip()).await.unwrap();
    within(
        10,
        "echo before SIGTERM",
        echo_roundtrip(&mut live, b"before SIGTERM"),
    )
    .await
    .unwrap();

    let zt = mesh.ztunnel_mut("n1");
    zt.sigterm().unwrap();
    let sigterm_at = Instant::now();

    // Readiness turns 503 while the process stays up for the live connection.
    let status = {
        let zt = &*zt;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // 0: no answer at all (the process is gone).
            let s = zt.readiness().await.unwrap_or(0);
            if s != 200 || Instant::now() > deadline {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(
        zt.is_running(),
        "ztunnel exited although a connection was live; log tail:\n{}",
        zt.log_tail(20)
    );
    assert_eq!(status, 503, "readiness while draining");
    let dump: serde_json::Value = serde_json::from_str(&zt.config_dump().await.unwrap()).unwrap();
    assert_eq!(dump["draining"], true, "config_dump while draining");
    assert!(
        dump["activeConnections"].as_u64() >= Some(1),
        "config_dump while draining: activeConnections {}",
        dump["activeConnections"]
    );

    // New connections from the captured pod are refused or dropped, never sent around the
    // proxy: a pod IP destination would be reachable without capture (n2 admits plaintext).
    let outcome = probe_echo(&a, addr("10.244.2.2:9000"), Duration::from_secs(2)).await;
    assert!(
        outcome.is_blocked(),
        "new connection a → b while draining: {outcome:?}"
    );
    let outcome = probe_echo(&a, echo_vip(), Duration::from_secs(2)).await;
    assert_ne!(
        outcome,
        Outcome::Echoed,
        "new connection a → VIP while draining"
    );

    // The live connection keeps working during the drain.
    within(
        10,
        "echo during drain",
        echo_roundtrip(&mut live, &random_bytes(256 << 10, 7)),
    )
    .await
    .expect("the live connection broke during the drain");
    assert!(
        sigterm_at.elapsed() < DRAIN,
        "the drain window passed before the echo"
    );
    assert!(
        zt.is_running(),
        "ztunnel exited before the live connection closed"
    );
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

    // With nothing left to drain the process exits cleanly (well before the deadline) …
    let status = zt.wait_exit(DRAIN).await.unwrap();
    assert!(
        status.success(),
        "ztunnel exit status {status}; log tail:\n{}",
        zt.log_tail(20)
    );
    eprintln!("ztunnel exited {:?} after SIGTERM", sigterm_at.elapsed());
    // … and leaves its capture rules in place: with no ztunnel, the pod's traffic is dropped,
    // never sent around the mesh.
    let after = CaptureState::read(&n1_ns).unwrap();
    assert!(
        after.is_installed_once(),
        "capture rules not left installed after exit: {after:?}; log tail:\n{}",
        zt.log_tail(20)
    );
    assert_eq!(before.ruleset, after.ruleset, "the ruleset changed on exit");
    let outcome = probe_echo(&a, addr("10.244.2.2:9000"), Duration::from_secs(2)).await;
    assert!(
        outcome.is_blocked(),
        "new connection a → b with ztunnel gone: {outcome:?}"
    );
    let rec = &server
        .wait_records(1, Duration::from_secs(5))
        .await
        .unwrap()[0];
    assert_eq!(
        rec.bytes,
        (b"before SIGTERM".len() + (256 << 10)) as u64,
        "the server did not get the whole live connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_connections_left_at_the_drain_deadline() {
    const DRAIN: Duration = Duration::from_secs(2);
    // Also the operator's teardown path: this one removes its rules on exit.
    let mut mesh = Mesh::two_nodes_with("drain-deadline", &standard_config(), |n, opts| {
        if n.name == "n1" {
            opts.extra_args
                .extend(["--drain-timeout", "2s", "--remove-capture-on-exit"].map(String::from));
        }
    })
    .await
    .unwrap();
    let _server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let n1_ns = mesh.node("n1").ns.handle();
    let mut live = mesh.pod("a").ns.connect(echo_vip()).await.unwrap();
    within(10, "echo", echo_roundtrip(&mut live, b"idle after this"))
        .await
        .unwrap();

    let zt = mesh.ztunnel_mut("n1");
    zt.sigterm().unwrap();
    let sigterm_at = Instant::now();
    // The connection stays open and idle: the drain waits for it until the deadline, no longer.
    let status = zt.wait_exit(DRAIN + Duration::from_secs(8)).await.unwrap();
    let took = sigterm_at.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took + Duration::from_millis(100) >= DRAIN,
        "ztunnel exited {took:?} after SIGTERM with a live connection, before the {DRAIN:?} drain deadline"
    );
    let after = CaptureState::read(&n1_ns).unwrap();
    assert!(
        after.is_clean(),
        "--remove-capture-on-exit left rules behind: {after:?}"
    );

    // The client learns that its connection is gone (EOF or reset), it does not hang.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), live.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection left at the deadline is still open: {read:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_destination_node_drains_live_tunnels() {
    const DRAIN: Duration = Duration::from_secs(20);
    let mut mesh = mesh_draining("drain-dest", "n2", DRAIN).await;
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let n2_ns = mesh.node("n2").ns.handle();
    let a = mesh.pod("a").ns.handle();
    let mut live = a.connect(echo_vip()).await.unwrap();
    within(10, "echo", echo_roundtrip(&mut live, b"before SIGTERM"))
        .await
        .unwrap();

    let zt = mesh.ztunnel_mut("n2");
    zt.sigterm().unwrap();
    let sigterm_at = Instant::now();
    let status = {
        let zt = &*zt;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = zt.readiness().await.unwrap_or(0);
            if s != 200 || Instant::now() > deadline {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(zt.is_running(), "n2 exited with a live tunnel");
    assert_eq!(status, 503, "readiness of n2 while draining");

    // The tunnel in flight keeps working; a new one is not admitted by the draining node.
    within(
        10,
        "echo during the destination's drain",
        echo_roundtrip(&mut live, &random_bytes(256 << 10, 11)),
    )
    .await
    .expect("the live tunnel broke when its destination ztunnel started draining");
    let outcome = probe_echo(&a, echo_vip(), Duration::from_secs(3)).await;
    assert!(
        outcome.is_blocked(),
        "new connection to the draining node: {outcome:?}"
    );
    within(
        10,
        "echo during the destination's drain, again",
        echo_roundtrip(&mut live, b"still draining"),
    )
    .await
    .unwrap();
    assert!(sigterm_at.elapsed() < DRAIN);
    live.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(10, "EOF", live.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());

    let status = zt.wait_exit(DRAIN).await.unwrap();
    assert!(status.success(), "exit status {status}");
    eprintln!("n2 exited {:?} after SIGTERM", sigterm_at.elapsed());
    let after = CaptureState::read(&n2_ns).unwrap();
    assert!(
        after.is_installed_once(),
        "capture rules not left installed: {after:?}"
    );
    let rec = &server
        .wait_records(1, Duration::from_secs(5))
        .await
        .unwrap()[0];
    assert_eq!(
        rec.bytes,
        (b"before SIGTERM".len() + (256 << 10) + b"still draining".len()) as u64
    );
}
