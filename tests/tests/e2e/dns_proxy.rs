//! The DNS proxy (`--dns-proxy`, 127.0.0.1:15053) with real resolver clients in the pods
//! (`getent`, `dig`, bash's `/dev/tcp`), each pod with a Kubernetes resolv.conf naming a
//! nameserver address that exists nowhere (10.96.0.53, kube-dns's role): capture diverts its
//! UDP and TCP port 53 to ztunnel, which answers mesh names itself (from the address the pod
//! asked, or the resolver would drop the answer) and forwards the rest to the node's resolver
//! (a test DNS server on n2). The users' serviceentry.yaml is used unchanged.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tests::admin::sum_metric;
use tests::apps::echo_server;
use tests::config::MeshConfig;
use tests::dns::{dns_server, DnsServer, PodResolvConf};
use tests::mesh::{standard_config, Mesh};
use tests::netns::Netns;
use tests::scenarios::{scenario, EXTERNAL_DB_ENDPOINTS};
use tests::support::{addr, any, eventually};

/// The nameserver the pods' resolv.conf names (nothing listens there).
const KUBE_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
/// The name only the upstream (the test DNS server on n2) knows, and its address.
const OUTSIDE: &str = "www.example.com";
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

struct DnsMesh {
    mesh: Mesh,
    _upstream: DnsServer,
    _resolv: Vec<PodResolvConf>,
    _dir: tests::testdir::TestDir,
}

/// The standard mesh with the scenario's entries under REGISTRY_ONLY, the DNS proxy on, pod
/// `c` opted out of DNS capture, and every pod on n1 resolving through [`KUBE_DNS`].
async fn dns_mesh(label: &str) -> DnsMesh {
    let dir = tests::testdir::TestDir::new(&format!("{label}-conf")).unwrap();
    let resolv = dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 10.0.0.2\noptions timeout:1 attempts:2\n",
    )
    .unwrap();
    let mut config: MeshConfig = standard_config()
        .registry_only()
        .document(&scenario("serviceentry.yaml"))
        .document(EXTERNAL_DB_ENDPOINTS);
    let c = config.workloads.iter_mut().find(|w| w.name == "c").unwrap();
    *c = c
        .clone()
        .annotation("ambient.istio.io/dns-capture", "false");
    let mesh = Mesh::two_nodes_with(label, &config, |_, opts| {
        opts.extra_args.extend([
            "--dns-proxy".into(),
            "--resolv-conf".into(),
            resolv.display().to_string(),
        ]);
    })
    .await
    .unwrap();
    let upstream = dns_server(
        &mesh.node("n2").ns,
        addr("10.0.0.2:53"),
        OUTSIDE,
        OUTSIDE_IP,
        60,
    )
    .unwrap();
    let resolv = ["a", "c"]
        .iter()
        .map(|p| PodResolvConf::kubernetes(&mesh.pod(p).ns, KUBE_DNS, "default").unwrap())
        .collect();
    DnsMesh {
        mesh,
        _upstream: upstream,
        _resolv: resolv,
        _dir: dir,
    }
}

/// Runs `argv` in `ns` (blocking, off the runtime) and returns stdout, trimmed.
async fn run(ns: &Netns, argv: &[&str]) -> String {
    let ns = ns.handle();
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = ns.exec_output(&argv).unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
            + &String::from_utf8_lossy(&out.stderr)
                .lines()
                .map(|l| format!("\n[stderr] {l}"))
                .collect::<String>()
    })
    .await
    .unwrap()
}

/// The first address `getent hosts NAME` prints in `ns`.
async fn getent(ns: &Netns, name: &str) -> Option<IpAddr> {
    let out = run(ns, &["getent", "hosts", name]).await;
    out.split_whitespace().next().and_then(|s| s.parse().ok())
}

/// `dig +short` in `ns` with extra options.
async fn dig(ns: &Netns, args: &[&str]) -> String {
    let mut argv = vec!["dig", "+short", "+time=2", "+tries=2"];
    argv.extend_from_slice(args);
    run(ns, &argv).await
}

/// `dig`'s status line (`NOERROR`, `NXDOMAIN`, …) for a query in `ns`.
async fn dig_status(ns: &Netns, args: &[&str]) -> String {
    let mut argv = vec!["dig", "+time=2", "+tries=2"];
    argv.extend_from_slice(args);
    let out = run(ns, &argv).await;
    out.lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or("").to_string())
        .unwrap_or_else(|| format!("no status in {out}"))
}

/// The automatic VIP of `host` from `/config_dump`.
async fn auto_vip(mesh: &Mesh, host: &str) -> IpAddr {
    let dump = mesh.ztunnel("n1").config_dump().await.unwrap();
    let json: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let vip = json
        .pointer("/config/services")
        .and_then(|s| s.as_array())
        .and_then(|s| s.iter().find(|s| s["hostname"] == host))
        .and_then(|s| s["vips"][0].as_str())
        .unwrap_or_else(|| panic!("no VIP for {host}"))
        .trim_start_matches('/')
        .parse()
        .unwrap();
    assert!(matches!(vip, IpAddr::V4(v) if v.octets()[..2] == [240, 240]));
    vip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_resolve_mesh_names_and_forward_the_rest() {
    let m = dns_mesh("dns-proxy").await;
    let mesh = &m.mesh;
    let a = &mesh.pod("a").ns;
    let c = &mesh.pod("c").ns;
    let echo: IpAddr = "10.96.0.10".parse().unwrap();

    // Service VIP by short and full name, glibc's resolver (search path, ndots:5).
    assert_eq!(getent(a, "echo").await, Some(echo));
    assert_eq!(getent(a, "echo.default").await, Some(echo));
    assert_eq!(
        getent(a, "echo.default.svc.cluster.local").await,
        Some(echo)
    );
    // dig checks the answer comes from the address it asked (10.96.0.53:53), over UDP and TCP.
    assert_eq!(
        dig(a, &["echo.default.svc.cluster.local"]).await,
        "10.96.0.10"
    );
    assert_eq!(dig(a, &["+search", "echo"]).await, "10.96.0.10");
    assert_eq!(
        dig(a, &["+tcp", "echo.default.svc.cluster.local"]).await,
        "10.96.0.10"
    );
    // The ServiceEntry host without addresses: its automatic VIP.
    let vip = auto_vip(mesh, "www.googleapis.com").await;
    assert_eq!(getent(a, "www.googleapis.com").await, Some(vip));
    assert_eq!(dig(a, &["www.googleapis.com"]).await, vip.to_string());
    // An outside name: forwarded to the node's resolver.
    assert_eq!(getent(a, OUTSIDE).await, Some(IpAddr::V4(OUTSIDE_IP)));
    assert_eq!(dig(a, &["+tcp", OUTSIDE]).await, OUTSIDE_IP.to_string());
    // SRV (even for a mesh name) is forwarded: the upstream's NXDOMAIN, never NOTIMP.
    assert_eq!(
        dig_status(a, &["SRV", "_http._tcp.echo.default.svc.cluster.local"]).await,
        "NXDOMAIN"
    );
    assert_eq!(dig_status(a, &["TXT", OUTSIDE]).await, "NOERROR");

    // Captured whatever nameserver the pod names; pod c (annotated out) reaches the real one,
    // which does not know mesh names.
    assert_eq!(
        dig(a, &["@10.0.0.2", "echo.default.svc.cluster.local"]).await,
        "10.96.0.10"
    );
    assert_eq!(
        dig_status(c, &["@10.0.0.2", "echo.default.svc.cluster.local"]).await,
        "NXDOMAIN"
    );
    assert_eq!(
        dig(c, &["@10.0.0.2", OUTSIDE]).await,
        OUTSIDE_IP.to_string()
    );

    // A malformed query: FORMERR with its ID, from the address queried; the proxy lives on.
    let garbage = [
        0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'b', b'r', b'o',
    ];
    let (reply, from) = a
        .run(move || async move {
            let s = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
            s.send_to(&garbage, SocketAddr::from((KUBE_DNS, 53)))
                .await
                .unwrap();
            let mut buf = [0u8; 512];
            let (n, from) = tokio::time::timeout(Duration::from_secs(3), s.recv_from(&mut buf))
                .await
                .expect("no answer to a malformed query")
                .unwrap();
            (buf[..n].to_vec(), from)
        })
        .unwrap();
    assert_eq!(from, SocketAddr::from((KUBE_DNS, 53)));
    assert_eq!(&reply[..2], &[0xbe, 0xef]);
    assert_eq!(reply[2] & 0x80, 0x80, "a response");
    assert_eq!(reply[3] & 0x0f, 1, "FORMERR");
    assert_eq!(getent(a, "echo").await, Some(echo));

    let zt = mesh.ztunnel("n1");
    let counted = eventually(Duration::from_secs(5), || async move {
        let s = zt.metrics().await?;
        let v = |name: &str, f: &[(&str, &str)]| sum_metric(&s, name, f);
        Ok(v("ztunnel_dns_requests_total", &[("kind", "a")]) >= 8.0
            && v("ztunnel_dns_requests_total", &[("kind", "malformed")]) >= 1.0
            && v("ztunnel_dns_forwarded_total", &[("kind", "srv")]) >= 1.0
            && v("ztunnel_dns_forwarded_total", &[("kind", "a")]) >= 1.0
            && v(
                "ztunnel_dns_request_duration_seconds_count",
                &[("path", "local")],
            ) >= 1.0
            && v("ztunnel_dns_failures_total", &[]) == 0.0)
    })
    .await;
    assert!(matches!(counted, Ok(true)), "metrics: {counted:?}");
}

/// The scenario's STATIC `external-db` entry with the README's headless Service + Endpoints:
/// reached by host name (bash resolves `external-db` through the DNS proxy and connects) under
/// REGISTRY_ONLY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_db_is_reached_by_host_name() {
    let m = dns_mesh("dns-extdb").await;
    let mesh = &m.mesh;
    let db = echo_server(&mesh.pod("d").ns, any(3306)).unwrap();
    let a = &mesh.pod("a").ns;
    assert_eq!(
        getent(a, "external-db").await,
        Some("10.244.2.3".parse().unwrap())
    );
    let out = run(
        a,
        &[
            "timeout",
            "10",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/external-db/3306 && printf ping >&3 && head -c 4 <&3",
        ],
    )
    .await;
    assert_eq!(out, "ping");
    db.wait_records(1, Duration::from_secs(5)).await.unwrap();
    mesh.ztunnel("n1")
        .wait_log_line(
            &[
                "dst=10.244.2.3:3306",
                "dst_service=external-db.default.svc.cluster.local",
            ],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
}

/// Cluster mode (configuration from the controller): the DNS proxy is on by default, and a pod
/// annotated `ambient.istio.io/dns-capture: "false"` is left to its own nameserver (here one
/// that does not exist, so it gets no answer at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_captures_dns_by_default_and_honours_the_annotation() {
    let mut objects = tests::cluster::echo_app();
    let mut c = tests::cluster::pod(
        "default",
        "c",
        "sa-c",
        "n1",
        "10.244.1.3",
        &[("app", "other")],
    );
    c["metadata"]["annotations"] = serde_json::json!({"ambient.istio.io/dns-capture": "false"});
    objects.push(c);
    let mesh = tests::cluster::ClusterMesh::start("dns-cluster", objects)
        .await
        .unwrap();
    let (a, c) = (&mesh.pod("a").ns, &mesh.pod("c").ns);
    let query = ["@10.96.0.53", "echo.default.svc.cluster.local"];
    let answered = eventually(Duration::from_secs(20), || async move {
        Ok(dig(a, &query).await == "10.96.0.10")
    })
    .await;
    assert!(matches!(answered, Ok(true)), "a: {answered:?}");
    let out = dig(c, &["+tries=1", query[0], query[1]]).await;
    assert!(
        !out.contains("10.96.0.10") && out.contains("no servers could be reached"),
        "c was captured: {out}"
    );
}
