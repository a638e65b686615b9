//! L4 security: AuthorizationPolicy (deny by port, allow by principal), PeerAuthentication
//! (STRICT refuses plaintext, PERMISSIVE admits it), and HBONE clients with a foreign or missing
//! certificate refused at the TLS layer while a mesh certificate is admitted.

use std::net::IpAddr;
use std::time::Duration;
use tests::apps::{echo_server, hash_server, probe_echo, send_to_hash_server, Outcome};
use tests::hbone;
use tests::mesh::{echo_vip, standard_config, Mesh};
use tests::support::{addr, any, within};
use tests::ztunnel::{Ca, CertFiles};

const PROBE: Duration = Duration::from_secs(10);

/// A denied connection: closed or reset by the mesh, never answered.
fn assert_denied(outcome: &Outcome, what: &str) {
    assert!(
        matches!(outcome, Outcome::Reset | Outcome::ClosedWithoutData),
        "{what}: expected reset/closed without data, got {outcome:?}"
    );
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_policy_blocks_port() {
    let mesh = Mesh::two_nodes("deny-port", &standard_config().document(DENY_9999))
        .await
        .unwrap();
    let b = &mesh.pod("b").ns;
    let _open = echo_server(b, any(9000)).unwrap();
    let denied = echo_server(b, any(9999)).unwrap();
    let a = &mesh.pod("a").ns;

    let outcome = probe_echo(a, addr("10.244.2.2:9999"), PROBE).await;
    assert_denied(&outcome, "a → b:9999");
    let outcome = probe_echo(a, addr("10.244.2.2:9000"), PROBE).await;
    assert_eq!(outcome, Outcome::Echoed, "other ports stay open");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(denied.records().is_empty(), "the denied port was reached");
}

const ALLOW_ONLY_SA_A: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: server-from-client-only
  namespace: default
spec:
  selector:
    matchLabels:
      app: server
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sa-a"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_policy_admits_only_named_principal() {
    let mesh = Mesh::two_nodes(
        "allow-principal",
        &standard_config().document(ALLOW_ONLY_SA_A),
    )
    .await
    .unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();

    let outcome = probe_echo(&mesh.pod("a").ns, echo_vip(), PROBE).await;
    assert_eq!(outcome, Outcome::Echoed, "sa-a is the allowed principal");
    let outcome = probe_echo(&mesh.pod("c").ns, echo_vip(), PROBE).await;
    assert_denied(&outcome, "c (sa-c) → b");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.peer_ips(),
        vec![IpAddr::from([10, 244, 1, 2])],
        "only a may reach b"
    );
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
async fn strict_mode_refuses_plaintext() {
    let config = standard_config().document(&peer_authentication("STRICT"));
    let mesh = Mesh::two_nodes("strict", &config).await.unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();

    // The n1 node itself is not captured: its plaintext reaches n2's inbound capture (15006).
    let outcome = probe_echo(&mesh.node("n1").ns, addr("10.244.2.2:9000"), PROBE).await;
    assert_denied(&outcome, "plaintext from node n1 under STRICT");
    let outcome = probe_echo(&mesh.pod("a").ns, echo_vip(), PROBE).await;
    assert_eq!(outcome, Outcome::Echoed, "mTLS traffic is still admitted");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.peer_ips(),
        vec![IpAddr::from([10, 244, 1, 2])],
        "plaintext reached the pod"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_mode_admits_plaintext() {
    let config = standard_config().document(&peer_authentication("PERMISSIVE"));
    let mesh = Mesh::two_nodes("permissive", &config).await.unwrap();
    let _sink = hash_server(&mesh.pod("b").ns, any(9000)).unwrap();

    let stream = mesh
        .node("n1")
        .ns
        .connect(addr("10.244.2.2:9000"))
        .await
        .unwrap();
    let reply = within(
        60,
        "plaintext to b",
        send_to_hash_server(stream, 1 << 20, 11),
    )
    .await
    .unwrap();
    assert_eq!(
        reply.peer.ip(),
        IpAddr::from([10, 0, 0, 1]),
        "b must see the real client (node n1)"
    );
    // It landed on n2's ztunnel (inbound plaintext capture), not straight on the pod.
    mesh.ztunnel("n2")
        .wait_log_line(&["10.0.0.1", "10.244.2.2:9000"], Duration::from_secs(5))
        .await
        .unwrap();
}

/// Issues a certificate for pod a's identity from `ca` into `<dir>/<name>`.
fn cert_for_a(mesh: &Mesh, ca: &Ca, name: &str) -> CertFiles {
    let out = mesh.dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    ca.issue("spiffe://cluster.local/ns/default/sa/sa-a", &out)
        .unwrap()
}

/// Positive control: the same hand-made client with a mesh certificate gets a working tunnel,
/// so a refusal elsewhere is the server's decision, not a broken client.
async fn assert_mesh_certificate_admitted(mesh: &Mesh) {
    let good = cert_for_a(mesh, &mesh.ca, "good-cert");
    let mut tunnel = hbone::connect(
        &mesh.node("n1").ns,
        addr("10.244.2.2:15008"),
        Some(&good),
        "10.244.2.2:9000",
    )
    .await
    .expect("HBONE with a mesh certificate must work");
    assert_eq!(tunnel.status, 200);
    let echoed = within(10, "echo through tunnel", tunnel.echo(b"hello over hbone"))
        .await
        .unwrap();
    assert_eq!(echoed, b"hello over hbone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_client_is_refused() {
    let mesh = Mesh::two_nodes("foreign-ca", &standard_config())
        .await
        .unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    assert_mesh_certificate_admitted(&mesh).await;

    let foreign_ca = Ca::init(&mesh.dir.join("foreign-ca")).unwrap();
    let foreign = cert_for_a(&mesh, &foreign_ca, "foreign-cert");
    let result = hbone::connect(
        &mesh.node("n1").ns,
        addr("10.244.2.2:15008"),
        Some(&foreign),
        "10.244.2.2:9000",
    )
    .await;
    match result {
        Ok(t) => panic!(
            "a certificate from a foreign CA was accepted (status {})",
            t.status
        ),
        Err(e) => eprintln!("refused as expected: {e:#}"),
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.records().len() <= 1, "only the control may reach b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    let mesh = Mesh::two_nodes("no-cert", &standard_config())
        .await
        .unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    assert_mesh_certificate_admitted(&mesh).await;

    let result = hbone::connect(
        &mesh.node("n1").ns,
        addr("10.244.2.2:15008"),
        None,
        "10.244.2.2:9000",
    )
    .await;
    match result {
        Ok(t) => panic!(
            "a client without certificate was accepted (status {})",
            t.status
        ),
        Err(e) => eprintln!("refused as expected: {e:#}"),
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.records().len() <= 1, "only the control may reach b");
}
