//! L4 hardening: a configuration change reaches live connections (a new DENY closes the
//! cross-node HBONE and same-node connections it now denies, a switch to STRICT closes live
//! plaintext), and source addresses cannot be forged (see the `source_*` tests).

use std::time::Duration;
use tests::admin::sum_metric;
use tests::apps::{echo_roundtrip, echo_server, probe_echo, Outcome};
use tests::mesh::{echo_vip, standard_config, Mesh};
use tests::support::{addr, any};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const PROBE: Duration = Duration::from_secs(10);
const RELOAD: Duration = Duration::from_secs(15);

fn assert_denied(outcome: &Outcome, what: &str) {
    assert!(
        matches!(outcome, Outcome::Reset | Outcome::ClosedWithoutData),
        "{what}: expected reset/closed without data, got {outcome:?}"
    );
}

/// Waits until the peer closes `stream` (EOF or reset); fails after `timeout`.
async fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 64];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(timeout, read).await.is_ok()
}

const DENY_9000: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-9000
  namespace: default
spec:
  action: DENY
  rules:
  - to:
    - operation:
        ports: ["9000"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_deny_policy_closes_live_connections() {
    let mesh = Mesh::two_nodes("revoke-deny", &standard_config())
        .await
        .unwrap();
    let _b = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let _c = echo_server(&mesh.pod("c").ns, any(9000)).unwrap();
    let _c_other = echo_server(&mesh.pod("c").ns, any(9001)).unwrap();
    let a = &mesh.pod("a").ns;
    // Cross-node (HBONE to n2) and same-node (a → c on n1) connections, plus one the new
    // policy does not cover.
    let mut remote = a.connect(echo_vip()).await.unwrap();
    let mut local = a.connect(addr("10.244.1.3:9000")).await.unwrap();
    let mut other = a.connect(addr("10.244.1.3:9001")).await.unwrap();
    for s in [&mut remote, &mut local, &mut other] {
        echo_roundtrip(s, b"before the policy").await.unwrap();
    }

    mesh.write_config(&standard_config().document(DENY_9000))
        .unwrap();
    mesh.wait_config(RELOAD, |d| d.contains("deny-9000"))
        .await
        .unwrap();
    assert!(
        closed_within(&mut remote, Duration::from_secs(5)).await,
        "the live cross-node connection stayed open under the new DENY"
    );
    assert!(
        closed_within(&mut local, Duration::from_secs(5)).await,
        "the live same-node connection stayed open under the new DENY"
    );
    echo_roundtrip(&mut other, b"still allowed")
        .await
        .expect("a connection the policy does not deny stays open");

    assert_denied(&probe_echo(a, echo_vip(), PROBE).await, "new a → echo");
    assert_denied(
        &probe_echo(a, addr("10.244.1.3:9000"), PROBE).await,
        "new a → c:9000",
    );

    for (node, path) in [("n2", "inbound_hbone"), ("n1", "outbound_local")] {
        let z = mesh.ztunnel(node);
        let line = z
            .wait_log_line(&["closing live connection", path], Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            line.contains("default/deny-9000"),
            "the log line names the policy: {line}"
        );
        let revoked = sum_metric(
            &z.metrics().await.unwrap(),
            "ztunnel_connections_revoked_total",
            &[],
        );
        assert_eq!(revoked, 1.0, "revoked connections counted on {node}");
    }
}

fn peer_authentication(mode: &str) -> String {
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: default
spec:
  mtls:
    mode: {mode}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_to_strict_closes_live_plaintext() {
    let permissive = standard_config().document(&peer_authentication("PERMISSIVE"));
    let mesh = Mesh::two_nodes("revoke-strict", &permissive).await.unwrap();
    let _b = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    // The node n1 itself is outside the mesh: its plaintext lands on n2's 15006.
    let n1 = &mesh.node("n1").ns;
    let mut plain = n1.connect(addr("10.244.2.2:9000")).await.unwrap();
    echo_roundtrip(&mut plain, b"plaintext while permissive")
        .await
        .unwrap();
    let mut mtls = mesh.pod("a").ns.connect(echo_vip()).await.unwrap();
    echo_roundtrip(&mut mtls, b"mtls").await.unwrap();

    mesh.write_config(&standard_config().document(&peer_authentication("STRICT")))
        .unwrap();
    mesh.wait_config(RELOAD, |d| d.contains("STRICT") || d.contains("Strict"))
        .await
        .unwrap();
    assert!(
        closed_within(&mut plain, Duration::from_secs(5)).await,
        "live plaintext stayed open after the switch to STRICT"
    );
    echo_roundtrip(&mut mtls, b"mtls still fine")
        .await
        .expect("mTLS connections are unaffected by STRICT");
    assert_denied(
        &probe_echo(n1, addr("10.244.2.2:9000"), PROBE).await,
        "new plaintext under STRICT",
    );
    let line = mesh
        .ztunnel("n2")
        .wait_log_line(
            &["closing live connection", "inbound_plaintext"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(line.contains("STRICT"), "{line}");
}
