//! Live configuration: ztunnel picks up a rewritten config file without restarting, and a bad
//! rewrite is rejected with a clear error while the last good snapshot keeps serving.

use std::time::Duration;
use tests::apps::{echo_server, probe_echo, Outcome};
use tests::config::{MeshConfig, Service, Workload};
use tests::mesh::{echo_vip, standard_config, Mesh};
use tests::support::{any, eventually};

const RELOAD: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_update_adds_endpoint_without_restart() {
    // Same workloads as the standard mesh, but no service yet.
    let before = MeshConfig::new()
        .workload(Workload::hbone("a", "10.244.1.2", "n1"))
        .workload(Workload::hbone("c", "10.244.1.3", "n1"))
        .workload(Workload::hbone("b", "10.244.2.2", "n2").label("app", "server"));
    let mut mesh = Mesh::two_nodes("reload-add", &before).await.unwrap();
    let _server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let pids: Vec<_> = mesh.ztunnels.iter().map(|z| z.pid()).collect();
    let outcome = probe_echo(&mesh.pod("a").ns, echo_vip(), Duration::from_secs(5)).await;
    assert_ne!(
        outcome,
        Outcome::Echoed,
        "the VIP must not work before the update"
    );

    mesh.write_config(&standard_config()).unwrap();
    mesh.wait_config(RELOAD, |dump| dump.contains("10.96.0.10"))
        .await
        .unwrap();

    let a = &mesh.pod("a").ns.handle();
    let works = eventually(Duration::from_secs(5), || async move {
        Ok(probe_echo(a, echo_vip(), Duration::from_secs(5)).await == Outcome::Echoed)
    })
    .await
    .unwrap();
    assert!(works, "the new endpoint is not reachable through the VIP");
    for z in &mut mesh.ztunnels {
        assert!(z.is_running(), "ztunnel on {} died", z.node);
    }
    let pids_after: Vec<_> = mesh.ztunnels.iter().map(|z| z.pid()).collect();
    assert_eq!(pids, pids_after, "ztunnel was restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_update_keeps_old_snapshot() {
    let mut mesh = Mesh::two_nodes("reload-invalid", &standard_config())
        .await
        .unwrap();
    let _server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let a = mesh.pod("a").ns.handle();
    assert_eq!(
        probe_echo(&a, echo_vip(), Duration::from_secs(5)).await,
        Outcome::Echoed
    );

    // A typo'd key: the loader must reject the whole file and name the key.
    let bad = standard_config()
        .render()
        .replace("workloadIps: [10.244.2.2]", "workloadIpz: [10.244.2.2]");
    assert!(bad.contains("workloadIpz"));
    mesh.write_config_text(&bad).unwrap();
    let m = &mesh;
    let noticed = eventually(RELOAD, || async move {
        Ok(m.ztunnels.iter().all(|z| z.log().contains("workloadIpz")))
    })
    .await
    .unwrap();
    assert!(
        noticed,
        "ztunnel did not report the bad key `workloadIpz` in its log"
    );

    for z in &mut mesh.ztunnels {
        assert!(z.is_running(), "ztunnel on {} died on a bad config", z.node);
    }
    for z in &mesh.ztunnels {
        let dump = z.config_dump().await.unwrap();
        assert!(
            dump.contains("10.244.2.2") && dump.contains("10.96.0.10"),
            "{} lost its last good snapshot:\n{dump}",
            z.node
        );
    }
    assert_eq!(
        probe_echo(&a, echo_vip(), Duration::from_secs(5)).await,
        Outcome::Echoed,
        "traffic must keep flowing on the old snapshot"
    );

    // The watcher survives: a later good update still applies.
    let fixed = standard_config().service(Service::new("echo2", "10.96.0.11").port(80, 9000));
    mesh.write_config(&fixed).unwrap();
    mesh.wait_config(RELOAD, |dump| dump.contains("10.96.0.11"))
        .await
        .unwrap();
}
