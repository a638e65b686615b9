//! L7 through the waypoint: a service whose config names a waypoint is reached by the client's
//! ztunnel tunnelling to the waypoint (15006, authority = VIP:port); the waypoint serves the
//! stream as HTTP/1.1 or h2c (or proxies it at L4), routes each request over the service's
//! endpoints and forwards it over HBONE with its own identity, keeping the client's IP. Checked
//! end to end with real processes: what the endpoint sees, the waypoint's access log and
//! metrics, the endpoint node's ztunnel log, and the wire between the nodes.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tests::admin::sum_metric;
use tests::apps::{echo_random, echo_roundtrip, echo_server, hex, random_bytes};
use tests::capture::Capture;
use tests::http_apps::{
    banner_echo_server, full_request_body, request, upgrade_handshake, H2Client, Http1Client,
    HttpMode, HttpReply,
};
use tests::l7mesh::L7Mesh;
use tests::support::{any, closed_within, eventually, within};
use tests::waypoint::field;
use tokio::io::AsyncReadExt;

const POD_A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2));
const POD_C: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 3));
const ECHO_HOST: &str = "echo.default.svc.cluster.local";
const ECHO_CLUSTER: &str = "outbound|8080||echo.default.svc.cluster.local";

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(data))
}

/// Counts replies per answering pod.
fn per_pod(replies: &[HttpReply]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in replies {
        *m.entry(r.pod()).or_insert(0) += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_through_waypoint_reaches_endpoint_with_client_ip() {
    let mut mesh = L7Mesh::builder("wp-basic").start().await.unwrap();
    let servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let wp_ip = mesh.waypoint_pod().ip;

    let mut client = within(
        10,
        "connect to the VIP",
        Http1Client::connect(&mesh.pod("a").ns, mesh.vip()),
    )
    .await
    .unwrap();
    let r = within(
        30,
        "GET through the waypoint",
        client.get(
            "/hello/world?x=1",
            &[
                ("user-agent", "waypoint-e2e/1"),
                ("x-request-id", "req-basic-1"),
            ],
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "body: {}", r.text());
    let info = r.json().unwrap();
    assert_eq!(info["pod"], "b", "{info}");
    assert_eq!(info["path"], "/hello/world?x=1", "{info}");
    assert_eq!(info["method"], "GET", "{info}");
    let seen: SocketAddr = info["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        seen.ip(),
        POD_A,
        "the endpoint must see the client's pod IP, not the waypoint's ({wp_ip})"
    );
    let recs = servers[0]
        .wait_requests(1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(recs.len(), 1, "exactly one request reached b: {recs:?}");
    assert_eq!(recs[0].peer.ip(), POD_A);
    assert_eq!(recs[0].header("x-request-id"), Some("req-basic-1"));
    assert_eq!(
        recs[0].header("host"),
        Some("10.96.0.10:8080"),
        "the Host header must reach the endpoint unchanged"
    );

    // The waypoint's access log has the request, routed to the service's default cluster.
    let wp = mesh.waypoint();
    let entries = wp
        .wait_access_log(1, Duration::from_secs(10), |e| {
            e["path"] == "/hello/world?x=1"
        })
        .await
        .unwrap();
    assert_eq!(
        entries.len(),
        1,
        "one access-log line per request: {entries:?}"
    );
    let e = &entries[0];
    assert_eq!(field(e, "method"), "GET", "{e}");
    assert_eq!(field(e, "response_code"), "200", "{e}");
    assert_eq!(field(e, "response_flags"), "-", "{e}");
    assert_eq!(field(e, "protocol"), "HTTP/1.1", "{e}");
    assert_eq!(field(e, "upstream_cluster"), ECHO_CLUSTER, "{e}");
    assert_eq!(field(e, "upstream_host"), "10.244.2.2:9000", "{e}");
    assert_eq!(
        field(e, "downstream_remote_address"),
        client.local_addr.to_string(),
        "{e}"
    );
    assert_eq!(field(e, "authority"), mesh.vip().to_string(), "{e}");
    assert_eq!(field(e, "request_id"), "req-basic-1", "{e}");
    assert_eq!(field(e, "user_agent"), "waypoint-e2e/1", "{e}");
    for f in [
        "start_time",
        "duration",
        "route_name",
        "x_forwarded_for",
        "response_flags",
    ] {
        assert!(e.get(f).is_some(), "access-log field {f} missing: {e}");
    }
    drop(client);

    // n1's ztunnel sent the connection to the waypoint, not to an endpoint.
    mesh.ztunnel("n1")
        .wait_log_line(
            &[
                "outbound_waypoint",
                "src=10.244.1.2:",
                "dst=10.96.0.10:8080",
                &format!("upstream={wp_ip}:15006"),
            ],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // n2's ztunnel received the request's tunnel from the waypoint (its identity), for the
    // client's IP. Its access line is written when the tunnel closes: stop the waypoint.
    mesh.stop_waypoint();
    let line = mesh
        .ztunnel("n2")
        .wait_log_line(
            &["inbound_hbone", "dst=10.244.2.2:9000"],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(
        line.contains(&format!("peer_identity={}", mesh.waypoint_identity())),
        "n2's ztunnel must see the waypoint as the peer: {line}"
    );
    assert!(
        line.contains("src=10.244.1.2:"),
        "n2's ztunnel must deliver for the client's IP: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_terminates_hbone_on_15008_as_istio_dials_it() {
    // Istio's ztunnel reaches a waypoint pod on 15008 (the port its Service calls `mesh`).
    let mesh = L7Mesh::builder("wp-15008")
        .waypoint_port(15008)
        .start()
        .await
        .unwrap();
    let _servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let mut client = within(
        10,
        "connect to the VIP",
        Http1Client::connect(&mesh.pod("a").ns, mesh.vip()),
    )
    .await
    .unwrap();
    let r = within(30, "GET through 15008", client.get("/via-15008", &[]))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "body: {}", r.text());
    assert_eq!(r.json().unwrap()["path"], "/via-15008");
    drop(client); // the access-log line is written when the connection closes
    mesh.ztunnel("n1")
        .wait_log_line(
            &[
                "outbound_waypoint",
                &format!("upstream={}:15008", mesh.waypoint_pod().ip),
            ],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_sees_each_clients_own_ip_through_waypoint() {
    let mesh = L7Mesh::builder("wp-client-ips").start().await.unwrap();
    let servers = mesh.start_http_servers(HttpMode::Auto).unwrap();

    // a, then c, then a again, each on its own keep-alive connection that stays open.
    let mut from_a = Http1Client::connect(&mesh.pod("a").ns, mesh.vip())
        .await
        .unwrap();
    let mut from_c = Http1Client::connect(&mesh.pod("c").ns, mesh.vip())
        .await
        .unwrap();
    let mut seen = Vec::new();
    for (i, who) in ["a", "c", "a", "c"].into_iter().enumerate() {
        let (client, ip) = if who == "a" {
            (&mut from_a, POD_A)
        } else {
            (&mut from_c, POD_C)
        };
        let r = within(30, "GET", client.get(&format!("/from-{who}/{i}"), &[]))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        seen.push((who, ip, r.peer().map(|p| p.ip())));
    }
    let wrong: Vec<_> = seen
        .iter()
        .filter(|(_, ip, got)| *got != Some(*ip))
        .collect();
    assert!(
        wrong.is_empty(),
        "the endpoint saw the wrong source IP for some requests (client, expected, seen): {wrong:?}; server records: {:?}",
        servers[0]
            .records()
            .iter()
            .map(|r| (r.path.clone(), r.peer, r.conn))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `ROUND_ROBIN` (set explicitly: Istio's default is LEAST_REQUEST) spreads the requests of one
/// keep-alive connection evenly, request by request.
async fn waypoint_round_robins_requests_over_endpoints() {
    const N: usize = 30;
    const ROUND_ROBIN: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo}\nspec:\n  host: echo\n  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n";
    let mesh = L7Mesh::builder("wp-rr")
        .endpoints(&["b", "d", "e"])
        .document(ROUND_ROBIN)
        .start()
        .await
        .unwrap();
    let servers = mesh.start_http_servers(HttpMode::Auto).unwrap();

    let mut client = Http1Client::connect(&mesh.pod("a").ns, mesh.vip())
        .await
        .unwrap();
    let mut replies = Vec::new();
    for i in 0..N {
        let r = within(30, "GET", client.get(&format!("/rr/{i}"), &[]))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        replies.push(r);
    }
    assert!(!client.is_closed(), "the keep-alive connection closed");

    let by_pod = per_pod(&replies);
    let expected: BTreeMap<String, usize> = ["b", "d", "e"]
        .iter()
        .map(|p| (p.to_string(), N / 3))
        .collect();
    assert_eq!(
        by_pod, expected,
        "{N} requests on one connection must spread evenly over the 3 endpoints"
    );
    let served: Vec<usize> = servers.iter().map(|s| s.request_count()).collect();
    assert_eq!(served, vec![N / 3; 3], "requests per server (b, d, e)");
    for s in &servers {
        assert_eq!(s.peer_ips(), vec![POD_A], "peers seen by {}", s.pod);
    }
    // Balanced per request, not per connection: all came on one downstream connection.
    let entries = mesh
        .waypoint()
        .wait_access_log(N, Duration::from_secs(10), |e| {
            field(e, "path").starts_with("/rr/")
        })
        .await
        .unwrap();
    let downstream: Vec<String> = entries
        .iter()
        .map(|e| field(e, "downstream_remote_address"))
        .collect();
    assert!(
        downstream
            .iter()
            .all(|d| *d == client.local_addr.to_string()),
        "expected every request from {}: {downstream:?}",
        client.local_addr
    );
    let mut upstreams: BTreeMap<String, usize> = BTreeMap::new();
    for e in &entries {
        *upstreams.entry(field(e, "upstream_host")).or_insert(0) += 1;
    }
    let expected_hosts: BTreeMap<String, usize> =
        ["10.244.2.2:9000", "10.244.2.3:9000", "10.244.2.4:9000"]
            .iter()
            .map(|h| (h.to_string(), N / 3))
            .collect();
    assert_eq!(upstreams, expected_hosts, "upstream_host in the access log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keepalive_and_chunked_bodies_pass_through() {
    const LEN: usize = 1 << 20;
    let mesh = L7Mesh::builder("wp-chunked").start().await.unwrap();
    let servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let mut client = Http1Client::connect(&mesh.pod("a").ns, mesh.vip())
        .await
        .unwrap();

    let mut sent = Vec::new();
    for i in 0..3u64 {
        let data = Bytes::from(random_bytes(LEN, 100 + i));
        let sha = sha256_hex(&data);
        let r = within(
            60,
            "chunked POST /echo",
            client.post_chunked(&format!("/echo/{i}"), data, 16 * 1024),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "POST {i}: {}", r.text());
        assert_eq!(
            r.header("x-body-len"),
            Some(LEN.to_string().as_str()),
            "POST {i}: the endpoint received a different body length"
        );
        assert_eq!(
            r.header("x-body-sha256"),
            Some(sha.as_str()),
            "POST {i}: the endpoint received different body bytes"
        );
        assert_eq!(r.body.len(), LEN, "POST {i}: echoed body length");
        assert_eq!(r.body_sha256(), sha, "POST {i}: echoed body corrupted");
        sent.push(sha);

        // A plain GET between the uploads, on the same connection.
        let g = within(30, "GET", client.get(&format!("/between/{i}"), &[]))
            .await
            .unwrap();
        assert_eq!(g.status, 200, "{}", g.text());
    }
    // A content-length body too.
    let data = Bytes::from(random_bytes(256 << 10, 7));
    let r = within(
        60,
        "POST with content-length",
        client.send(request(
            "POST",
            "/echo/fixed",
            &[],
            full_request_body(data.clone()),
        )),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body_sha256(),
        sha256_hex(&data),
        "fixed-length echo corrupted"
    );
    assert!(!client.is_closed(), "the keep-alive connection closed");

    let recs = servers[0].records();
    let posts: Vec<_> = recs.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(posts.len(), 4, "{recs:?}");
    for (p, sha) in posts.iter().zip(&sent) {
        assert_eq!((p.body_len, &p.body_sha256), (LEN as u64, sha));
    }
    // All 7 requests on one downstream connection, each logged once.
    let entries = mesh
        .waypoint()
        .wait_access_log(7, Duration::from_secs(10), |_| true)
        .await
        .unwrap();
    assert_eq!(entries.len(), 7, "{entries:?}");
    for e in &entries {
        assert_eq!(
            field(e, "downstream_remote_address"),
            client.local_addr.to_string(),
            "{e}"
        );
        assert_eq!(field(e, "response_code"), "200", "{e}");
    }
    let methods: Vec<String> = entries.iter().map(|e| field(e, "method")).collect();
    assert_eq!(
        methods,
        ["POST", "GET", "POST", "GET", "POST", "GET", "POST"],
        "access-log order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_through_waypoint() {
    const STREAMS: usize = 20;
    const DELAY_MS: u64 = 400;
    let mesh = L7Mesh::builder("wp-h2c")
        .endpoints(&["b", "d"])
        .start()
        .await
        .unwrap();
    let servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let client = within(
        10,
        "h2c connect",
        H2Client::connect(&mesh.pod("a").ns, mesh.vip()),
    )
    .await
    .unwrap();

    // Warm up (the first request opens the upstream legs), then many concurrent streams,
    // each held DELAY_MS by the server: sequential streams would take STREAMS × DELAY_MS.
    let r = within(30, "h2c GET", client.get("/warmup", &[]))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version, "HTTP/2");
    let delay = DELAY_MS.to_string();
    let started = Instant::now();
    let reqs = (0..STREAMS).map(|i| {
        let c = client.clone();
        let delay = delay.clone();
        async move {
            c.get(&format!("/h2/{i}"), &[("x-delay-ms", delay.as_str())])
                .await
        }
    });
    let replies: Vec<HttpReply> = within(
        60,
        "concurrent h2c streams",
        futures_util::future::join_all(reqs),
    )
    .await
    .into_iter()
    .collect::<anyhow::Result<_>>()
    .unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(DELAY_MS * STREAMS as u64 / 3),
        "{STREAMS} streams of {DELAY_MS} ms took {elapsed:?}: not concurrent"
    );
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.status, 200, "stream {i}: {}", r.text());
        assert_eq!(r.version, "HTTP/2");
        let info = r.json().unwrap();
        assert_eq!(info["path"], format!("/h2/{i}"), "replies crossed streams");
        assert_eq!(r.peer().map(|p| p.ip()), Some(POD_A), "stream {i}");
    }
    let by_pod = per_pod(&replies);
    assert_eq!(
        by_pod.values().copied().collect::<Vec<_>>(),
        vec![STREAMS / 2; 2],
        "streams per endpoint: {by_pod:?}"
    );

    // Bodies both ways on concurrent streams.
    let posts = (0..4u64).map(|i| {
        let c = client.clone();
        async move {
            let data = Bytes::from(random_bytes(512 << 10, 40 + i));
            let r = c
                .send(request(
                    "POST",
                    &format!("/echo/h2/{i}"),
                    &[],
                    tests::http_apps::chunked_body(data.clone(), 20_000),
                ))
                .await?;
            anyhow::Ok((r, sha256_hex(&data)))
        }
    });
    for (i, res) in within(60, "h2c POSTs", futures_util::future::join_all(posts))
        .await
        .into_iter()
        .enumerate()
    {
        let (r, sha) = res.unwrap();
        assert_eq!(r.status, 200, "POST {i}: {}", r.text());
        assert_eq!(
            r.header("x-body-sha256"),
            Some(sha.as_str()),
            "POST {i} upload"
        );
        assert_eq!(r.body_sha256(), sha, "POST {i} echo");
    }
    assert!(!client.is_closed());

    // gRPC needs h2 end to end: the endpoints were spoken to in HTTP/2 as well.
    for s in &servers {
        for rec in s.records() {
            assert_eq!(rec.version, "HTTP/2", "{} got {rec:?}", s.pod);
        }
    }
    let entries = mesh
        .waypoint()
        .wait_access_log(1 + STREAMS + 4, Duration::from_secs(10), |_| true)
        .await
        .unwrap();
    for e in &entries {
        assert_eq!(field(e, "protocol"), "HTTP/2", "{e}");
        assert_eq!(field(e, "upstream_cluster"), ECHO_CLUSTER, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_http_traffic_is_proxied_at_l4() {
    const BANNER: &[u8] = b"220 banner-server ready\r\n";
    let mesh = L7Mesh::builder("wp-l4")
        .port(7000, 7000)
        .port(7001, 7001)
        .start()
        .await
        .unwrap();
    let b = &mesh.pod("b").ns;
    let echo = echo_server(b, any(7000)).unwrap();
    let banner = banner_echo_server(b, any(7001), BANNER).unwrap();
    let a = &mesh.pod("a").ns;

    // Client speaks first, not HTTP (including a near miss of a request line).
    let mut s = within(10, "connect", a.connect(mesh.vip_port(7000)))
        .await
        .unwrap();
    for msg in [
        &b"HELLO this is not http\r\n"[..],
        b"GETX /not-a-method HTTP/1.1\r\n",
        &random_bytes(256 << 10, 9),
    ] {
        within(30, "echo round trip", echo_roundtrip(&mut s, msg))
            .await
            .unwrap();
    }
    drop(s);
    // A whole stream with half-close.
    let s = a.connect(mesh.vip_port(7000)).await.unwrap();
    let t = within(60, "1 MiB echo", echo_random(s, 1 << 20, 3))
        .await
        .unwrap();
    assert!(t.echoed_intact(), "{t:?}");
    let recs = echo.wait_records(2, Duration::from_secs(10)).await.unwrap();
    assert!(
        recs.iter().any(|r| r.sha256 == t.sent_sha256),
        "the endpoint did not receive the stream intact: {recs:?}"
    );
    assert_eq!(
        echo.peer_ips(),
        vec![POD_A],
        "endpoint must see the client's IP"
    );

    // Server speaks first: nothing to sniff, the waypoint must fall back to TCP after its
    // sniff timeout and connect, so the banner arrives.
    let mut s = within(10, "connect", a.connect(mesh.vip_port(7001)))
        .await
        .unwrap();
    let started = Instant::now();
    let mut got = vec![0u8; BANNER.len()];
    within(
        10,
        "banner of a server-speaks-first protocol",
        s.read_exact(&mut got),
    )
    .await
    .unwrap();
    assert_eq!(got, BANNER, "{:?}", String::from_utf8_lossy(&got));
    eprintln!("banner arrived after {:?}", started.elapsed());
    within(30, "echo after banner", echo_roundtrip(&mut s, b"QUIT\r\n"))
        .await
        .unwrap();
    drop(s);
    assert_eq!(
        banner.peers().iter().map(|p| p.ip()).collect::<Vec<_>>(),
        vec![POD_A]
    );

    // Proxied at L4: no HTTP request was logged, the L4 lines name the service's cluster.
    let wp = mesh.waypoint();
    let ok = eventually(Duration::from_secs(10), || async {
        Ok(wp.tcp_access_log_lines().len() >= 3)
    })
    .await;
    let tcp = wp.tcp_access_log_lines();
    assert!(
        matches!(ok, Ok(true)),
        "expected 3 L4 access lines: {tcp:?}\n{}",
        wp.log_tail(20)
    );
    for port in [7000, 7001] {
        let cluster = format!("outbound|{port}||{ECHO_HOST}");
        assert!(
            tcp.iter().any(|e| e.to_string().contains(&cluster)),
            "no L4 access line for {cluster}: {tcp:?}"
        );
    }
    assert!(
        wp.access_log_lines().is_empty(),
        "non-HTTP streams were served as HTTP: {:?}",
        wp.access_log_lines()
    );
}

/// Denies `/admin/*` on the echo endpoints (an L7 rule).
const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: echo-deny-admin
  namespace: default
spec:
  selector:
    matchLabels:
      app: echo
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin/*"]
"#;

/// A policy with HTTP rules cannot be dodged by not speaking HTTP: for a stream the waypoint
/// proxies at L4 it evaluates the endpoint's policies as Envoy's RBAC network filter does (a
/// DENY rule with HTTP fields matches every connection), while HTTP requests on the HTTP port
/// are judged by their path. The endpoint's ztunnel skips L7-rule policies for the waypoint's
/// connections, so without this the TCP stream would get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_deny_policy_also_closes_non_http_streams() {
    let mesh = L7Mesh::builder("wp-l4authz")
        .port(7000, 7000)
        .document(DENY_ADMIN)
        .start()
        .await
        .unwrap();
    let _servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let b = &mesh.pod("b").ns;
    let echo = echo_server(b, any(7000)).unwrap();
    let a = &mesh.pod("a").ns;

    // HTTP: judged per request.
    let mut client = within(10, "connect", Http1Client::connect(a, mesh.vip()))
        .await
        .unwrap();
    let ok = within(30, "GET /public", client.get("/public/x", &[]))
        .await
        .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    let denied = within(30, "GET /admin", client.get("/admin/x", &[]))
        .await
        .unwrap();
    assert_eq!(denied.status, 403, "{}", denied.text());

    // Not HTTP: the DENY rule's path field cannot be evaluated, so it matches: closed.
    let mut s = within(10, "connect", a.connect(mesh.vip_port(7000)))
        .await
        .unwrap();
    let outcome = within(
        30,
        "a non-HTTP stream",
        echo_roundtrip(&mut s, b"HELLO this is not http\r\n"),
    )
    .await;
    assert!(
        outcome.is_err(),
        "the stream was echoed despite the DENY policy"
    );
    assert!(
        echo.peer_ips().is_empty(),
        "the endpoint was reached: {:?}",
        echo.peer_ips()
    );
    let wp = mesh.waypoint();
    let logged = eventually(Duration::from_secs(10), || async {
        Ok(wp.log_tail(50).contains("tcp connection denied"))
    })
    .await;
    assert!(
        matches!(logged, Ok(true)),
        "no denial in the waypoint log:\n{}",
        wp.log_tail(30)
    );
    assert!(
        wp.log_tail(50).contains("echo-deny-admin"),
        "{}",
        wp.log_tail(30)
    );
}

/// A workload can name a waypoint too: traffic addressed to the pod's own IP (not the VIP) is
/// tunnelled to the waypoint with that address as authority, served as HTTP there (L7 policy
/// applies, the request is logged) and forwarded to that very pod, with the client's IP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_addressed_traffic_goes_through_the_workloads_waypoint() {
    let mesh = L7Mesh::builder("wp-wl")
        .workload_waypoint()
        .document(DENY_ADMIN)
        .start()
        .await
        .unwrap();
    let _servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let pod_b: SocketAddr = (mesh.pod("b").ip, 9000).into();
    let mut client = within(
        10,
        "connect to pod b",
        Http1Client::connect(&mesh.pod("a").ns, pod_b),
    )
    .await
    .unwrap();
    let r = within(30, "GET /hello", client.get("/hello", &[]))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let info = r.json().unwrap();
    assert_eq!(info["pod"], "b", "{info}");
    let seen: SocketAddr = info["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(seen.ip(), POD_A, "the pod sees the client's IP");
    let denied = within(30, "GET /admin", client.get("/admin/x", &[]))
        .await
        .unwrap();
    assert_eq!(denied.status, 403, "L7 policy applies: {}", denied.text());
    let wp = mesh.waypoint();
    let lines = wp
        .wait_access_log(2, Duration::from_secs(10), |_| true)
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", wp.log_tail(20)));
    assert!(
        lines.iter().any(|e| field(e, "path") == "/hello"
            && field(e, "authority") == pod_b.to_string()
            && field(e, "upstream_host") == pod_b.to_string()),
        "{lines:?}"
    );
}

/// `connectionPool` limits apply to streams proxied at L4 too: with `maxConnections: 1` and one
/// pending slot, a second connection waits for the first and a third is refused (closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_pool_limits_l4_streams() {
    const DR: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo}\nspec:\n  host: echo\n  trafficPolicy:\n    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}\n";
    let mesh = L7Mesh::builder("wp-l4pool")
        .port(7000, 7000)
        .app_protocol(7000, "tcp")
        .document(DR)
        .start()
        .await
        .unwrap();
    let b = &mesh.pod("b").ns;
    let _echo = echo_server(b, any(7000)).unwrap();
    let a = &mesh.pod("a").ns;
    let vip = mesh.vip_port(7000);
    let mut first = within(10, "connect 1", a.connect(vip)).await.unwrap();
    within(10, "echo on 1", echo_roundtrip(&mut first, b"one"))
        .await
        .unwrap();
    let mut second = within(10, "connect 2", a.connect(vip)).await.unwrap();
    let waiting = tokio::time::timeout(
        Duration::from_millis(500),
        echo_roundtrip(&mut second, b"two"),
    )
    .await;
    assert!(
        waiting.is_err(),
        "the second connection must wait for a slot"
    );
    let mut third = within(10, "connect 3", a.connect(vip)).await.unwrap();
    let refused = within(10, "third is refused", echo_roundtrip(&mut third, b"three")).await;
    assert!(
        refused.is_err(),
        "the third connection must be refused (pool and queue full)"
    );
    // Closing the first lets the waiting one through (its bytes were queued).
    drop(first);
    let mut got = [0u8; 3];
    within(10, "second gets its echo", second.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_metrics_count_requests() {
    const OK: usize = 5;
    const NOT_FOUND: usize = 3;
    let mesh = L7Mesh::builder("wp-metrics").start().await.unwrap();
    let _servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let mut client = Http1Client::connect(&mesh.pod("a").ns, mesh.vip())
        .await
        .unwrap();
    for i in 0..OK {
        let r = client.get(&format!("/ok/{i}"), &[]).await.unwrap();
        assert_eq!(r.status, 200);
    }
    for i in 0..NOT_FOUND {
        let r = client
            .get(&format!("/missing/{i}"), &[("x-status", "404")])
            .await
            .unwrap();
        assert_eq!(r.status, 404, "the upstream's status must pass through");
    }

    let wp = mesh.waypoint();
    let base = [
        ("reporter", "waypoint"),
        ("destination_service", ECHO_HOST),
        ("destination_service_name", "echo"),
        ("destination_service_namespace", "default"),
    ];
    let with = |code: &'static str| {
        let mut f = base.to_vec();
        f.push(("response_code", code));
        f
    };
    let counted = eventually(Duration::from_secs(10), || async {
        let m = wp.metrics().await?;
        Ok(
            sum_metric(&m, "istio_requests_total", &with("200")) >= OK as f64
                && sum_metric(&m, "istio_requests_total", &with("404")) >= NOT_FOUND as f64,
        )
    })
    .await;
    let m = wp.metrics().await.unwrap();
    let requests: Vec<String> = m
        .iter()
        .filter(|s| s.name == "istio_requests_total")
        .map(|s| format!("{:?} {}", s.labels, s.value))
        .collect();
    assert!(
        matches!(counted, Ok(true)),
        "istio_requests_total did not count {OK}×200 and {NOT_FOUND}×404 ({counted:?}):\n{}",
        requests.join("\n")
    );
    assert_eq!(
        sum_metric(&m, "istio_requests_total", &with("200")),
        OK as f64,
        "200s counted once each:\n{}",
        requests.join("\n")
    );
    assert_eq!(
        sum_metric(&m, "istio_requests_total", &with("404")),
        NOT_FOUND as f64,
        "404s counted once each:\n{}",
        requests.join("\n")
    );
    // Workload and principal labels of both ends.
    let who = [
        ("source_workload", "a"),
        ("source_workload_namespace", "default"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/sa-a",
        ),
        ("destination_workload", "b"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/sa-b",
        ),
        ("response_code", "200"),
        // Canonical service labels (from `app`) and the protocol, as Istio's dashboards use.
        ("source_app", "client"),
        ("source_canonical_service", "client"),
        ("destination_app", "echo"),
        ("destination_canonical_service", "echo"),
        ("destination_version", "unknown"),
        ("request_protocol", "http"),
    ];
    assert_eq!(
        sum_metric(&m, "istio_requests_total", &who),
        OK as f64,
        "source/destination labels:\n{}",
        requests.join("\n")
    );
    assert!(
        sum_metric(
            &m,
            "istio_request_duration_milliseconds_count",
            &with("200")
        ) >= OK as f64,
        "istio_request_duration_milliseconds not recorded"
    );
}

/// TLS record headers: a handshake record carrying a ClientHello, and application data.
fn has_client_hello(raw: &[u8]) -> bool {
    raw.windows(6)
        .any(|w| w[0] == 0x16 && w[1] == 0x03 && (w[2] == 0x01 || w[2] == 0x03) && w[5] == 0x01)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_sends_service_traffic_to_waypoint() {
    const PATH_CANARY: &str = "/PATH-CANARY-5e1d7b";
    const HEADER_CANARY: &str = "HEADER-CANARY-93ac0f";
    const BODY_CANARY: &[u8] = b"BODY-CANARY-c4f2a8-";
    let mesh = L7Mesh::builder("wp-wire").start().await.unwrap();
    let _servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let wp_ip = mesh.waypoint_pod().ip;
    let n1 = mesh.mesh.node("n1");
    let capture = Capture::start(&n1.ns, &n1.link_if, &mesh.mesh.dir.join("link.pcap")).unwrap();

    let mut client = Http1Client::connect(&mesh.pod("a").ns, mesh.vip())
        .await
        .unwrap();
    let r = within(
        30,
        "GET",
        client.get(PATH_CANARY, &[("x-canary", HEADER_CANARY)]),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let body: Vec<u8> = BODY_CANARY.iter().copied().cycle().take(64 << 10).collect();
    let r = within(
        30,
        "POST",
        client.send(request(
            "POST",
            "/echo",
            &[],
            full_request_body(body.clone()),
        )),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.as_ref(), body.as_slice());
    drop(client);

    let pcap = capture.stop().unwrap();
    assert_eq!(pcap.dropped, 0, "capture incomplete: {}", pcap.summary);
    assert!(
        pcap.tcp_payload_bytes() >= 2 * body.len(),
        "the requests did not cross the captured link ({} payload bytes)",
        pcap.tcp_payload_bytes()
    );
    let stray: Vec<_> = pcap
        .tcp()
        .filter(|p| {
            !((p.dst == wp_ip && p.dst_port == 15006) || (p.src == wp_ip && p.src_port == 15006))
        })
        .collect();
    assert!(
        stray.is_empty(),
        "TCP on the node link not to/from the waypoint's {wp_ip}:15006: {:?}",
        &stray[..stray.len().min(5)]
    );
    assert!(
        pcap.tcp()
            .any(|p| p.dst == wp_ip && p.dst_port == 15006 && p.payload_len > 0),
        "no data to the waypoint's 15006 on the link"
    );
    assert!(
        has_client_hello(&pcap.raw),
        "no TLS ClientHello on the link"
    );
    assert!(
        pcap.contains(&[0x17, 0x03, 0x03]),
        "no TLS application-data records on the link"
    );
    for canary in [
        PATH_CANARY.as_bytes(),
        HEADER_CANARY.as_bytes(),
        BODY_CANARY,
        b"HTTP/1.1",
    ] {
        assert!(
            !pcap.contains(canary),
            "plaintext {:?} seen on the node link",
            String::from_utf8_lossy(canary)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_answers_503_when_no_endpoint_can_serve() {
    // No server listens on b: the endpoint's ztunnel refuses the CONNECT, the waypoint answers
    // 503 with Envoy's `UF` (upstream connection failure).
    let mesh = L7Mesh::builder("wp-503").start().await.unwrap();
    let mut client = Http1Client::connect(&mesh.pod("a").ns, mesh.vip())
        .await
        .unwrap();
    let r = within(30, "GET", client.get("/nobody-listens", &[]))
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    let wp = mesh.waypoint();
    let e = wp
        .wait_access_log(1, Duration::from_secs(10), |e| {
            e["path"] == "/nobody-listens"
        })
        .await
        .unwrap()
        .remove(0);
    assert_eq!(field(&e, "response_code"), "503", "{e}");
    assert_eq!(field(&e, "response_flags"), "UF,URX", "{e}");
    assert_eq!(field(&e, "upstream_host"), "10.244.2.2:9000", "{e}");

    // The only endpoint becomes unhealthy (config reload): `UH`, no upstream attempted.
    let mut cfg = mesh.config.clone();
    cfg.workloads
        .iter_mut()
        .find(|w| w.name == "b")
        .unwrap()
        .healthy = false;
    mesh.write_config(&cfg).unwrap();
    let mut client = Http1Client::connect(&mesh.pod("a").ns, mesh.vip())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    for i in 0.. {
        let path = format!("/unhealthy/{i}");
        let r = within(30, "GET", client.get(&path, &[])).await.unwrap();
        assert_eq!(r.status, 503, "{}", r.text());
        let e = wp
            .wait_access_log(1, Duration::from_secs(5), |e| e["path"] == path.as_str())
            .await
            .unwrap()
            .remove(0);
        last = e.to_string();
        if field(&e, "response_flags") == "UH" || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        last.contains(r#""response_flags":"UH""#),
        "no `UH` 503 after the endpoint became unhealthy; last access line: {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_closing_its_connection_keeps_the_client_connection() {
    // The endpoint answers with `connection: close` and closes its (upstream) connection. That
    // header is hop-by-hop (RFC 9110 §7.6.1): the waypoint must open a new upstream connection
    // for the next request, and must not close the client's keep-alive connection.
    let mesh = L7Mesh::builder("wp-upstream-close").start().await.unwrap();
    let servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let mut client = Http1Client::connect(&mesh.pod("a").ns, mesh.vip())
        .await
        .unwrap();
    for i in 0..6 {
        let close = i % 2 == 0;
        let headers: &[(&str, &str)] = if close { &[("x-conn-close", "1")] } else { &[] };
        let r = within(30, "GET", client.get(&format!("/close/{i}"), headers))
            .await
            .unwrap_or_else(|e| panic!("request {i} on the kept-alive client connection: {e:#}"));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.pod(), "b");
        assert!(
            r.header("connection")
                .is_none_or(|v| !v.eq_ignore_ascii_case("close")),
            "request {i}: the endpoint's hop-by-hop `connection: close` was forwarded to the client \
             (so the client drops its keep-alive connection)"
        );
        // Let the client notice a close, if the waypoint closed the connection.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !client.is_closed(),
            "request {i}: the waypoint closed the client's keep-alive connection because the \
             endpoint closed its own"
        );
    }
    assert!(
        servers[0].connections() >= 3,
        "the endpoint closed after every other request, yet served on {} connections",
        servers[0].connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_headers_are_not_forwarded() {
    // RFC 9110 §7.6.1: a proxy removes `connection`, the fields it names, and the other
    // hop-by-hop fields before forwarding; end-to-end fields pass unchanged.
    let mesh = L7Mesh::builder("wp-hop-by-hop").start().await.unwrap();
    let servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let mut client = Http1Client::connect(&mesh.pod("a").ns, mesh.vip())
        .await
        .unwrap();
    let r = within(
        30,
        "GET",
        client.get(
            "/hop",
            &[
                ("connection", "keep-alive, x-hop-secret"),
                ("x-hop-secret", "must-not-arrive"),
                ("keep-alive", "timeout=30"),
                ("proxy-connection", "keep-alive"),
                ("x-end-to-end", "must-arrive"),
            ],
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = servers[0].records().remove(0);
    assert_eq!(rec.header("x-end-to-end"), Some("must-arrive"), "{rec:?}");
    assert_eq!(
        rec.header("host"),
        Some(mesh.vip().to_string().as_str()),
        "{rec:?}"
    );
    for name in ["x-hop-secret", "keep-alive", "proxy-connection"] {
        assert!(
            rec.header(name).is_none(),
            "hop-by-hop request header {name} was forwarded to the endpoint: {:?}",
            rec.headers
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_upgrade_passes_through_waypoint() {
    // WebSocket-style upgrades: `101 Switching Protocols`, then raw bytes both ways.
    let mesh = L7Mesh::builder("wp-upgrade").start().await.unwrap();
    let _servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let a = &mesh.pod("a").ns;

    // Control: straight to the pod (L4 through the ztunnels only) the server upgrades.
    let direct: SocketAddr = "10.244.2.2:9000".parse().unwrap();
    let mut s = a.connect(direct).await.unwrap();
    let head = upgrade_handshake(&mut s, "10.244.2.2:9000", "direct to the pod").await;
    assert!(head.starts_with("HTTP/1.1 101"), "direct: {head}");
    within(
        10,
        "direct upgraded echo",
        echo_roundtrip(&mut s, b"ping-direct"),
    )
    .await
    .unwrap();
    drop(s);

    // Through the service VIP, i.e. the waypoint.
    let mut s = a.connect(mesh.vip()).await.unwrap();
    let head = upgrade_handshake(&mut s, &mesh.vip().to_string(), "via the waypoint").await;
    assert!(head.starts_with("HTTP/1.1 101"), "via the waypoint: {head}");
    within(
        10,
        "upgraded echo through the waypoint",
        echo_roundtrip(&mut s, b"ping-through-waypoint"),
    )
    .await
    .unwrap();
    within(
        10,
        "bulk upgraded echo through the waypoint",
        echo_roundtrip(&mut s, &random_bytes(256 << 10, 77)),
    )
    .await
    .unwrap();
}

/// Issue 9 item 4 for upgraded connections: a WebSocket-style stream through the waypoint is
/// closed when a new policy denies the request that opened it; one on another path stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_policy_closes_live_upgraded_connection_at_the_waypoint() {
    let mesh = L7Mesh::builder("wp-upg-revoke").start().await.unwrap();
    let _servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let a = &mesh.pod("a").ns;
    let vip = mesh.vip().to_string();
    let mut s = a.connect(mesh.vip()).await.unwrap();
    let head = upgrade_handshake(&mut s, &vip, "before the policy").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    within(10, "upgraded echo", echo_roundtrip(&mut s, b"ping"))
        .await
        .unwrap();

    let wp = mesh.waypoint();
    let before = sum_metric(
        &wp.metrics().await.unwrap(),
        "waypoint_connections_revoked_total",
        &[],
    );
    let deny = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-upgrade-path
  namespace: default
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/upgrade"]
"#;
    mesh.write_config(&mesh.config.clone().document(deny))
        .unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(10)).await,
        "the upgraded connection stayed open under the new DENY"
    );
    wp.wait_log_line(
        &["closing live connection", "waypoint_upgraded", "/upgrade"],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let after = sum_metric(
        &wp.metrics().await.unwrap(),
        "waypoint_connections_revoked_total",
        &[],
    );
    assert_eq!(after - before, 1.0, "one revocation counted");
    // A new upgrade on that path is refused at its request.
    let mut again = a.connect(mesh.vip()).await.unwrap();
    let head = upgrade_handshake(&mut again, &vip, "after the policy").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demoapp_canary_shape_serves_from_all_five_endpoints() {
    // The shape later canary tests build on: demoapp with v1.0 ×3 and v1.1 ×2 behind the
    // waypoint. Without a VirtualService, and with ROUND_ROBIN, every endpoint takes its turn.
    const ROUND_ROBIN: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: demoapp}\nspec:\n  host: demoapp\n  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n";
    let mesh = L7Mesh::demoapp_canary("wp-demoapp")
        .document(ROUND_ROBIN)
        .start()
        .await
        .unwrap();
    assert_eq!(mesh.endpoints.len(), 5);
    let _servers = mesh.start_http_servers(HttpMode::Auto).unwrap();

    let dump = mesh.waypoint().config_dump().await.unwrap();
    let text = dump.to_string();
    let workloads = dump["config"]["workloads"]
        .as_array()
        .unwrap_or_else(|| panic!("no config.workloads in /config_dump: {text:.2000}"));
    let mut versions: BTreeMap<String, usize> = BTreeMap::new();
    for w in workloads {
        if w["labels"]["app"] == "demoapp" {
            *versions
                .entry(w["labels"]["version"].as_str().unwrap_or("?").to_string())
                .or_insert(0) += 1;
        }
    }
    assert_eq!(
        versions,
        BTreeMap::from([("v1.0".to_string(), 3), ("v1.1".to_string(), 2)]),
        "version labels the waypoint knows"
    );

    let mut client = Http1Client::connect(&mesh.pod("a").ns, mesh.vip())
        .await
        .unwrap();
    let mut replies = Vec::new();
    for i in 0..10 {
        let r = within(30, "GET", client.get(&format!("/demo/{i}"), &[]))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.peer().map(|p| p.ip()), Some(POD_A));
        replies.push(r);
    }
    let by_pod = per_pod(&replies);
    let expected: BTreeMap<String, usize> = mesh.endpoints.iter().map(|e| (e.clone(), 2)).collect();
    assert_eq!(by_pod, expected);
    let e = mesh
        .waypoint()
        .wait_access_log(1, Duration::from_secs(10), |_| true)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        field(&e, "upstream_cluster"),
        "outbound|80||demoapp.default.svc.cluster.local",
        "{e}"
    );
}
