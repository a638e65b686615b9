//! The proxy's sockets on loopback (no capture): UDP and TCP queries, answers from the mesh,
//! forwarding, FORMERR, and the TCP connection caps. Needs CAP_NET_ADMIN (IP_TRANSPARENT), as
//! every ztunnel test binary run in CI does.

use super::*;
use crate::dns_proxy::forward::Forwarder;
use crate::dns_proxy::DnsMetrics;
use common::config::ConfigStore;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use std::str::FromStr;

const CONFIG: &str = r#"
workloads:
- {uid: a, name: a, namespace: default, serviceAccount: sa-a, workloadIps: [127.0.0.1], protocol: HBONE, node: n1}
services:
- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["/10.96.0.10"], ports: {8080: 9000}}
"#;

/// An upstream on loopback answering every query with its question and TXT-less NOERROR,
/// flagged so the test can tell it answered (RA set, AA clear, one made-up answer count).
async fn upstream() -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    let addr = udp.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::response(q.metadata.id, q.metadata.op_code);
            r.metadata.recursion_available = true;
            r.metadata.response_code = ResponseCode::NXDomain;
            r.add_queries(q.queries.iter().cloned());
            let _ = udp.send_to(&r.to_vec().expect("encode"), peer).await;
        }
    });
    addr
}

struct Running {
    udp: SocketAddr,
    tcp: SocketAddr,
    metrics: DnsMetrics,
    registry: prometheus_client::registry::Registry,
}

async fn start(idle: Duration) -> Running {
    let snap = common::config::load_str(CONFIG, "t.yaml").expect("config");
    let store = Arc::new(ConfigStore::new(snap));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = DnsMetrics::register(&mut registry);
    let forwarder = Forwarder::new(Ok(vec![upstream().await]), 16);
    let proxy = Arc::new(DnsProxy::new(store, None, forwarder, metrics.clone()));
    let udp = udp_socket("127.0.0.1:0".parse().expect("addr")).expect("udp socket (root?)");
    let udp_addr = udp.local_addr().expect("addr");
    let tcp = crate::socket::transparent_listener("127.0.0.1:0".parse().expect("addr"))
        .expect("tcp listener");
    let tcp_addr = tcp.local_addr().expect("addr");
    tokio::spawn(serve_udp(udp, proxy.clone()));
    let limits = TcpLimits {
        idle,
        ..TcpLimits::default()
    };
    tokio::spawn(serve_tcp(tcp, proxy, limits));
    Running {
        udp: udp_addr,
        tcp: tcp_addr,
        metrics,
        registry,
    }
}

fn query(name: &str, t: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).expect("name"), t));
    m.to_vec().expect("encode")
}

async fn ask_udp(server: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    s.send_to(bytes, server).await.expect("send");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf))
        .await
        .ok()?
        .expect("recv");
    Some(Message::from_vec(&buf[..n]).expect("decode"))
}

async fn ask_tcp(stream: &mut tokio::net::TcpStream, bytes: &[u8]) -> Message {
    stream
        .write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .expect("write");
    stream.write_all(bytes).await.expect("write");
    let n = stream.read_u16().await.expect("len");
    let mut buf = vec![0u8; usize::from(n)];
    stream.read_exact(&mut buf).await.expect("read");
    Message::from_vec(&buf).expect("decode")
}

fn first_a(m: &Message) -> Option<Ipv4Addr> {
    m.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

#[tokio::test]
async fn udp_answers_mesh_names_forwards_the_rest_and_formerrs_garbage() {
    let r = start(Duration::from_secs(10)).await;
    // The client (127.0.0.1) is workload `a` of namespace default: the short name works.
    let m = ask_udp(r.udp, &query("echo.", RecordType::A))
        .await
        .expect("answer");
    assert_eq!(first_a(&m), Some(Ipv4Addr::new(10, 96, 0, 10)));
    assert!(m.metadata.authoritative);
    // SRV for a mesh name: forwarded, the upstream's NXDOMAIN comes back (never NOTIMP).
    let m = ask_udp(
        r.udp,
        &query("echo.default.svc.cluster.local.", RecordType::SRV),
    )
    .await
    .expect("answer");
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.queries[0].query_type(), RecordType::SRV);
    // A truncated question: FORMERR with the query's ID.
    let garbage = [0x55, 0x66, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 9, b'x'];
    let m = ask_udp(r.udp, &garbage).await.expect("FORMERR");
    assert_eq!(m.metadata.id, 0x5566);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // Shorter than a header: no answer, and the proxy still serves.
    assert!(ask_udp(r.udp, &[1, 2, 3]).await.is_none());
    let m = ask_udp(r.udp, &query("echo.default.", RecordType::A))
        .await
        .expect("answer");
    assert_eq!(first_a(&m), Some(Ipv4Addr::new(10, 96, 0, 10)));

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &r.registry).expect("encode");
    for line in [
        "ztunnel_dns_requests_total{kind=\"a\"} 2",
        "ztunnel_dns_requests_total{kind=\"srv\"} 1",
        "ztunnel_dns_requests_total{kind=\"malformed\"} 2",
        "ztunnel_dns_forwarded_total{kind=\"srv\"} 1",
        "ztunnel_dns_request_duration_seconds_count{path=\"local\"} 2",
        "ztunnel_dns_request_duration_seconds_count{path=\"forwarded\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing in {text}");
    }
    let no_failures = crate::dns_proxy::ReasonLabels {
        reason: "timeout".into(),
    };
    assert_eq!(r.metrics.failures.get_or_create(&no_failures).get(), 0);
}

#[tokio::test]
async fn tcp_answers_in_order_and_caps_connections_per_client() {
    let r = start(Duration::from_secs(10)).await;
    let mut s = tokio::net::TcpStream::connect(r.tcp)
        .await
        .expect("connect");
    for _ in 0..3 {
        let m = ask_tcp(
            &mut s,
            &query("echo.default.svc.cluster.local.", RecordType::A),
        )
        .await;
        assert_eq!(first_a(&m), Some(Ipv4Addr::new(10, 96, 0, 10)));
    }
    let m = ask_tcp(&mut s, &query("elsewhere.example.", RecordType::A)).await;
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NXDomain,
        "forwarded"
    );
    // `per_client` connections are served; one more is closed at once.
    let mut open = vec![s];
    for _ in 1..TcpLimits::default().per_client {
        let mut c = tokio::net::TcpStream::connect(r.tcp)
            .await
            .expect("connect");
        let m = ask_tcp(&mut c, &query("echo.", RecordType::A)).await;
        assert_eq!(first_a(&m), Some(Ipv4Addr::new(10, 96, 0, 10)));
        open.push(c);
    }
    let mut extra = tokio::net::TcpStream::connect(r.tcp)
        .await
        .expect("connect");
    let q = query("echo.", RecordType::A);
    let _ = extra.write_all(&(q.len() as u16).to_be_bytes()).await;
    let _ = extra.write_all(&q).await;
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "answered over the cap: {closed:?}"
    );
    // Closing one frees its slot.
    drop(open.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = tokio::net::TcpStream::connect(r.tcp)
        .await
        .expect("connect");
    let m = ask_tcp(&mut again, &query("echo.", RecordType::A)).await;
    assert_eq!(first_a(&m), Some(Ipv4Addr::new(10, 96, 0, 10)));
}

#[tokio::test]
async fn idle_and_half_sent_tcp_connections_are_closed() {
    let r = start(Duration::from_millis(300)).await;
    // Nothing sent: closed after the idle time, not before.
    let mut idle = tokio::net::TcpStream::connect(r.tcp)
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(3), idle.read(&mut b))
        .await
        .expect("closed within 3 s");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed too early"
    );
    // A length prefix promising more than ever arrives: closed too (slowloris).
    let mut partial = tokio::net::TcpStream::connect(r.tcp)
        .await
        .expect("connect");
    partial.write_all(&[0, 40, 1, 2, 3]).await.expect("write");
    let n = tokio::time::timeout(Duration::from_secs(3), partial.read(&mut b))
        .await
        .expect("closed within 3 s");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}
