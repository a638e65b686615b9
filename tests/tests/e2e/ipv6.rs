//! IPv6 of mesh pods (issue 9 item 13): ztunnel captures IPv4 only, so a captured pod's IPv6
//! must never bypass the mesh. With the pods dual-stack and the nodes forwarding IPv6, a mesh
//! pod's IPv6 TCP is reset at its node (a dual-stack client falls back to IPv4 at once) and
//! IPv6 towards a mesh pod is dropped; link-local neighbour discovery keeps working. The same
//! connections succeed once the capture is removed, so the topology itself routes IPv6.

use std::net::SocketAddr;
use std::time::Duration;
use tests::apps::{echo_server, Outcome};
use tests::mesh::{standard_config, Mesh};
use tests::netns::Netns;
use tests::topology::{Node, Pod};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The pod's IPv6 address: `fd00:<node>::<last octet of its IPv4>`.
fn v6_of(pod: &Pod, node: &Node) -> String {
    format!("fd00:{}::{}", node.index, pod.ip.octets()[3])
}

/// Dual stack: node link `fd00::<i>/64`, pod `/128`s routed on their veth, a link-local
/// gateway `fe80::1` on the node side of each pod veth, and routes between the nodes.
fn add_ipv6(mesh: &Mesh) {
    for node in &mesh.topo.nodes {
        let ns = &node.ns;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
        let me = format!("fd00::{}", node.index);
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{me}/64"),
            "dev",
            &node.link_if,
            "nodad",
        ])
        .unwrap();
        let other = if node.index == 1 { 2 } else { 1 };
        ns.ip(&[
            "-6",
            "route",
            "add",
            &format!("fd00:{other}::/64"),
            "via",
            &format!("fd00::{other}"),
        ])
        .unwrap();
    }
    for pod in &mesh.topo.pods {
        let node = mesh.node(&pod.node);
        let v6 = v6_of(pod, node);
        pod.ns
            .ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/128"),
                "dev",
                "eth0",
                "nodad",
            ])
            .unwrap();
        node.ns
            .ip(&[
                "-6",
                "addr",
                "add",
                "fe80::1/64",
                "dev",
                &pod.host_if,
                "nodad",
            ])
            .unwrap();
        node.ns
            .ip(&[
                "-6",
                "route",
                "add",
                &format!("{v6}/128"),
                "dev",
                &pod.host_if,
            ])
            .unwrap();
        pod.ns
            .ip(&[
                "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ])
            .unwrap();
    }
}

/// One IPv6 echo exchange from `ns` to `addr`, classified.
async fn probe_v6(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Outcome {
    let std = ns
        .run_blocking(|| -> std::io::Result<std::net::TcpStream> {
            let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .unwrap()
        .unwrap();
    let socket = tokio::net::TcpSocket::from_std_stream(std);
    let attempt = async move {
        let mut s = socket.connect(addr).await?;
        s.write_all(b"v6").await?;
        let mut got = [0u8; 2];
        s.read_exact(&mut got).await?;
        Ok::<_, std::io::Error>(got == *b"v6")
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(true)) => Outcome::Echoed,
        Ok(Ok(false)) => Outcome::Other("wrong echo".into()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Outcome::Reset,
        Ok(Err(e)) => Outcome::Other(e.to_string()),
        Err(_) => Outcome::TimedOut,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_of_mesh_pods_is_refused_or_dropped_never_forwarded() {
    let mut mesh = Mesh::two_nodes("ipv6", &standard_config()).await.unwrap();
    add_ipv6(&mesh);
    let b6: SocketAddr = format!("[{}]:9200", v6_of(mesh.pod("b"), mesh.node("n2")))
        .parse()
        .unwrap();
    let a6: SocketAddr = format!("[{}]:9200", v6_of(mesh.pod("a"), mesh.node("n1")))
        .parse()
        .unwrap();
    let (a, b, d) = (
        mesh.pod("a").ns.handle(),
        mesh.pod("b").ns.handle(),
        mesh.pod("d").ns.handle(),
    );
    let _b_server = echo_server(&b, b6).unwrap();
    let _a_server = echo_server(&a, a6).unwrap();

    // Mesh pod a → b over IPv6: reset at a's node, at once.
    let started = std::time::Instant::now();
    let out = probe_v6(&a, b6, Duration::from_secs(3)).await;
    assert!(
        matches!(out, Outcome::Refused | Outcome::Reset),
        "mesh pod a's IPv6 connection: {out:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the reset took {:?}",
        started.elapsed()
    );
    // Non-mesh pod d → mesh pod a over IPv6: dropped at a's node (d's node forwards it).
    let out = probe_v6(&d, a6, Duration::from_secs(2)).await;
    assert!(out.is_blocked(), "IPv6 into mesh pod a: {out:?}");

    // The topology routes IPv6: without the capture both connections work.
    let bin = tests::ztunnel::ztunnel_bin().unwrap();
    mesh.ztunnels.clear();
    for node in &mesh.topo.nodes {
        node.ns
            .exec(&[bin.to_str().unwrap(), "capture", "remove"])
            .unwrap();
    }
    assert_eq!(
        probe_v6(&a, b6, Duration::from_secs(5)).await,
        Outcome::Echoed
    );
    assert_eq!(
        probe_v6(&d, a6, Duration::from_secs(5)).await,
        Outcome::Echoed
    );
}
