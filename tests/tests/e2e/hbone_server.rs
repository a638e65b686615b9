//! The HBONE server's per-stream answers (DESIGN.md "HBONE wire contract"): 200 for a good
//! CONNECT, 400 for a non-CONNECT request, a bad authority or an authority IP other than the one
//! the connection arrived on, 401 when policy denies, 503 when the pod port refuses — each on its
//! own stream, leaving the other streams of the same HTTP/2 connection alone.

use std::time::Duration;
use tests::apps::echo_server;
use tests::hbone::{HboneConnection, Tunnel};
use tests::mesh::{standard_config, Mesh};
use tests::support::{addr, any, within};

const DENY_9999: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-9999
  namespace: default
spec:
  action: DENY
  rules:
  - to:
    - operation:
        ports: ["9999"]
"#;

/// Sends `payload` on `tunnel` and checks it comes back.
async fn assert_echoes(tunnel: &mut Tunnel, payload: &[u8], what: &str) {
    let got = within(10, what, tunnel.echo(payload))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!(got, payload, "{what}: echo differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_hbone_requests_get_error_status_without_disturbing_other_streams() {
    let mesh = Mesh::two_nodes("hbone-status", &standard_config().document(DENY_9999))
        .await
        .unwrap();
    let b = &mesh.pod("b").ns;
    let server = echo_server(b, any(9000)).unwrap();
    let denied = echo_server(b, any(9999)).unwrap();
    // Nothing listens on b:9001; d (10.244.2.3) is another pod on node 2.
    let cert_dir = mesh.dir.join("client-cert");
    std::fs::create_dir_all(&cert_dir).unwrap();
    let cert = mesh
        .ca
        .issue("spiffe://cluster.local/ns/default/sa/sa-a", &cert_dir)
        .unwrap();

    let mut conn =
        HboneConnection::open(&mesh.node("n1").ns, addr("10.244.2.2:15008"), Some(&cert))
            .await
            .expect("mTLS + HTTP/2 to b's ztunnel");
    let mut stream_a = conn.connect("10.244.2.2:9000").await.unwrap();
    assert_eq!(stream_a.status, 200, "a good CONNECT");
    assert_echoes(
        &mut stream_a,
        b"stream A, first",
        "stream A before the bad streams",
    )
    .await;

    let get = http::Request::builder()
        .method(http::Method::GET)
        .uri("http://10.244.2.2:9000/")
        .body(())
        .unwrap();
    let connect = |authority: &str| {
        http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .body(())
            .unwrap()
    };
    let cases: Vec<(&str, http::Request<()>, bool, u16)> = vec![
        ("GET instead of CONNECT", get, true, 400),
        (
            "authority that is not ip:port",
            connect("not-an-address:80"),
            false,
            400,
        ),
        (
            "authority without a port",
            connect("10.244.2.2"),
            false,
            400,
        ),
        (
            "authority IP other than the one connected to",
            connect("10.244.2.3:9000"),
            false,
            400,
        ),
        (
            "port nothing listens on",
            connect("10.244.2.2:9001"),
            false,
            503,
        ),
        (
            "port denied by AuthorizationPolicy",
            connect("10.244.2.2:9999"),
            false,
            401,
        ),
    ];
    for (i, (what, req, end_stream, want)) in cases.into_iter().enumerate() {
        let resp = conn
            .request(req, end_stream)
            .await
            .unwrap_or_else(|e| panic!("{what}: no response: {e:#}"));
        assert_eq!(resp.status.as_u16(), want, "{what}");
        assert!(
            resp.is_end_stream(),
            "{what}: the {want} response must end the stream"
        );
        assert!(!conn.is_closed(), "{what}: the HTTP/2 connection died");
        let payload = format!("stream A after bad stream {i}");
        assert_echoes(
            &mut stream_a,
            payload.as_bytes(),
            &format!("stream A after: {what}"),
        )
        .await;
    }

    // The connection still takes new streams.
    let mut stream_b = conn.connect("10.244.2.2:9000").await.unwrap();
    assert_eq!(stream_b.status, 200, "a good CONNECT after the bad ones");
    assert_echoes(&mut stream_b, b"stream B", "stream B").await;
    assert_echoes(&mut stream_a, b"stream A, last", "stream A at the end").await;
    assert!(!conn.is_closed());
    for (name, stream) in [("A", stream_a), ("B", stream_b)] {
        let rest = within(10, "half-close", stream.finish())
            .await
            .unwrap_or_else(|e| panic!("closing stream {name}: {e:#}"));
        assert!(rest.is_empty(), "stream {name}: extra bytes {rest:?}");
    }
    assert!(!conn.is_closed());
    drop(conn);

    // Only the two good streams reached b, and nothing reached the denied port.
    let records = server
        .wait_records(2, Duration::from_secs(10))
        .await
        .unwrap();
    let mut bytes: Vec<u64> = records.iter().map(|r| r.bytes).collect();
    bytes.sort();
    let a_bytes = b"stream A, first".len()
        + (0..6)
            .map(|i| format!("stream A after bad stream {i}").len())
            .sum::<usize>()
        + b"stream A, last".len();
    assert_eq!(
        bytes,
        vec![b"stream B".len() as u64, a_bytes as u64],
        "b did not get exactly the bytes of streams A and B: {records:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        denied.records().is_empty(),
        "the policy-denied port was reached"
    );
}
