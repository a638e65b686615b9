//! The TIME_WAIT trap of issue 9 item 13. After a connection-per-request load whose server
//! closes first (HTTP/1.0 style), the client's node holds a TIME_WAIT socket per connection,
//! left by ztunnel's accepted `pod:port ⇄ destination` socket (ztunnel closed towards the pod
//! first). With the capture in place they are harmless; once nothing captures those tuples
//! (the operator removed the capture, or the pod left the mesh), TCP early demux attaches such
//! a TIME_WAIT socket to the pod's forwarded SYN of a plain connection reusing the port, and
//! `ip_forward` drops any packet carrying a socket: that port cannot reach the server for
//! 60 s. ztunnel destroys those sockets whenever it stops capturing their tuples.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tests::config::{MeshConfig, Service, Workload};
use tests::mesh::{standard_config, Mesh};
use tests::netns::Netns;
use tests::support::{addr, any, within};
use tests::tproxy::CaptureState;
use tests::ztunnel::ZtunnelProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECTIONS: usize = 300;
const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);

/// TIME_WAIT sockets in a namespace: (all, those whose local address is not the namespace's:
/// left by transparent sockets).
fn time_wait(ns: &Netns) -> (usize, usize) {
    let local = ns.exec(&["ip", "-4", "-o", "addr", "show"]).unwrap();
    let local: Vec<&str> = local
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3)?.split('/').next())
        .collect();
    let tw = ns
        .exec(&["ss", "-4", "-H", "-t", "-n", "state", "time-wait"])
        .unwrap();
    let all: Vec<&str> = tw.lines().filter(|l| !l.trim().is_empty()).collect();
    let foreign = all
        .iter()
        .filter(|l| {
            let src = l.split_whitespace().nth(2).unwrap_or("");
            let ip = src.rsplit_once(':').map_or(src, |(ip, _)| ip);
            !local.contains(&ip) && !ip.starts_with("127.")
        })
        .count();
    (all.len(), foreign)
}

/// A server on `port` in `ns` that answers one request per connection, then closes first.
fn closing_server(ns: &Netns, port: u16) -> tokio::task::JoinHandle<()> {
    let listener = ns.tcp_listener(any(port)).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = [0u8; 64];
                if let Ok(n) = s.read(&mut req).await {
                    let _ = s.write_all(&req[..n]).await;
                }
            });
        }
    })
}

/// One request from `pod` to `target` (from `port` when given), read until the server closes.
async fn request(pod: &Netns, target: SocketAddr, port: Option<u16>, what: &str) {
    let socket = pod.tcp_socket().unwrap();
    if let Some(port) = port {
        socket.set_reuseaddr(true).unwrap();
        socket.bind(SocketAddr::new(A.into(), port)).unwrap();
    }
    let mut s = tokio::time::timeout(Duration::from_secs(3), socket.connect(target))
        .await
        .unwrap_or_else(|_| panic!("{what}: connecting from port {port:?} timed out (SYN dropped)"))
        .unwrap_or_else(|e| panic!("{what}: connecting from port {port:?}: {e}"));
    s.write_all(what.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    within(5, what, s.read_to_end(&mut reply)).await.unwrap();
    assert_eq!(reply, what.as_bytes(), "{what}");
}

/// [`CONNECTIONS`] requests from pod a to `target`; returns the client ports used. Waits for
/// the closes to travel the chain (server, n2, n1, client, and back).
async fn load(a: &Netns, target: SocketAddr) -> Vec<u16> {
    let mut ports = Vec::new();
    for i in 0..CONNECTIONS {
        let mut s = a.connect(target).await.unwrap();
        ports.push(s.local_addr().unwrap().port());
        let req = format!("request {i}");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        within(10, "reply and close", s.read_to_end(&mut reply))
            .await
            .unwrap();
        assert_eq!(reply, req.as_bytes());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_remove_after_a_kill_leaves_no_time_wait_trap() {
    let mut mesh = Mesh::two_nodes("timewait-remove", &standard_config())
        .await
        .unwrap();
    let _server = closing_server(&mesh.pod("b").ns, 9100);
    let a = mesh.pod("a").ns.handle();
    let target = addr("10.244.2.2:9100");
    let ports = load(&a, target).await;
    for node in ["n1", "n2"] {
        mesh.ztunnel_mut(node).kill9().await.unwrap();
    }
    let (n1, n2) = (mesh.node("n1").ns.handle(), mesh.node("n2").ns.handle());
    let (n1_tw, n2_tw) = (time_wait(&n1), time_wait(&n2));
    eprintln!(
        "after {CONNECTIONS} connections and kill -9: TIME_WAIT (all, transparent) n1 {n1_tw:?}, n2 {n2_tw:?}"
    );
    assert!(
        n1_tw.1 >= CONNECTIONS / 2,
        "expected the load to leave transparent TIME_WAIT sockets on n1: {n1_tw:?}"
    );

    // The restart path: with the capture in place, TPROXY hands a SYN that meets one of
    // those TIME_WAIT sockets to the new listener, so the reused ports work through the mesh.
    let config = standard_config();
    for node in ["n1", "n2"] {
        let opts = mesh.opts_for(mesh.node(node), &config);
        let log = mesh.dir.join(&format!("ztunnel-{node}-restarted.log"));
        let ns = mesh.node(node).ns.handle();
        let zt = ZtunnelProcess::start(&ns, &opts, &log).await.unwrap();
        let slot = mesh.ztunnels.iter().position(|z| z.node == node).unwrap();
        mesh.ztunnels[slot] = zt;
    }
    request(
        &a,
        target,
        ports.last().copied(),
        "through the restarted mesh",
    )
    .await;
    mesh.ztunnels.clear();

    // The operator takes the mesh off the node.
    let bin = tests::ztunnel::ztunnel_bin().unwrap();
    for ns in [&n1, &n2] {
        ns.exec(&[bin.to_str().unwrap(), "capture", "remove"])
            .unwrap();
        assert!(CaptureState::read(ns).unwrap().is_clean());
    }
    let (n1_after, n2_after) = (time_wait(&n1), time_wait(&n2));
    eprintln!(
        "after capture remove: TIME_WAIT (all, transparent) n1 {n1_after:?}, n2 {n2_after:?}"
    );
    assert_eq!(
        (n1_after.1, n2_after.1),
        (0, 0),
        "capture remove left transparent TIME_WAIT sockets"
    );
    // Plain connections from ports the load used reach the server at once. (Not the port just
    // used through the restarted mesh: the client's own socket of it may still be closing.)
    for &port in ports.iter().rev().skip(1).take(5) {
        request(&a, target, Some(port), "plain, capture removed").await;
    }
}

/// Cluster-style capture that follows the configuration (no `--pod-iface`/`--pod-cidr`): when
/// pod a leaves the mesh, n1 stops capturing it and destroys the TIME_WAIT sockets naming it,
/// so a's plain connections from the ports it used through the mesh work at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_leaving_the_mesh_is_not_caught_by_time_wait() {
    let config = standard_config();
    let mesh = Mesh::two_nodes_with("timewait-leave", &config, |n, opts| {
        if n.name == "n1" {
            opts.pod_ifaces.clear();
            opts.pod_cidrs.clear();
        }
    })
    .await
    .unwrap();
    let n1 = mesh.node("n1").ns.handle();
    let zt = mesh.ztunnel("n1");
    zt.wait_log_line(
        &["capture rules installed", "10.244.1.2/32"],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let _server = closing_server(&mesh.pod("b").ns, 9100);
    let a = mesh.pod("a").ns.handle();
    let target = addr("10.244.2.2:9100");
    let ports = load(&a, target).await;
    let before = time_wait(&n1);
    eprintln!("after {CONNECTIONS} connections: TIME_WAIT (all, transparent) on n1 {before:?}");
    assert!(before.1 >= CONNECTIONS / 2, "n1: {before:?}");

    // a leaves the mesh (c and b stay).
    let without_a = MeshConfig::new()
        .workload(Workload::hbone("c", "10.244.1.3", "n1").label("app", "other"))
        .workload(Workload::hbone("b", "10.244.2.2", "n2").label("app", "server"))
        .service(Service::new("echo", "10.96.0.10").port(8080, 9000))
        .endpoint("b", "echo");
    mesh.write_config(&without_a).unwrap();
    let line = zt
        .wait_log_line(
            &["no longer captured", "10.244.1.2"],
            Duration::from_secs(15),
        )
        .await
        .unwrap();
    eprintln!("n1: {line}");
    let after = time_wait(&n1);
    eprintln!("after a left the mesh: TIME_WAIT (all, transparent) on n1 {after:?}");
    assert_eq!(after.1, 0, "TIME_WAIT sockets naming a are left on n1");
    // n2 still captures b: a's plaintext is admitted there (no PeerAuthentication: permissive).
    for &port in ports.iter().rev().take(5) {
        request(&a, target, Some(port), "plain, a out of the mesh").await;
    }
}
