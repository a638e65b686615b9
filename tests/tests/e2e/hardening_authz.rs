//! Authorization bypasses closed at the waypoint, end to end through real ztunnels and a real
//! waypoint:
//! - a DENY on `/admin` cannot be dodged by spelling the path differently (`//admin`,
//!   `/./admin`, `/%61dmin`, `/x/../admin`, backslashes): the waypoint normalizes the path before
//!   authorization and routing, forwards the normalized path, and refuses escaped slashes;
//! - a VirtualService on service A that routes to service B cannot carry a request past B's
//!   own L7 DENY policy (B's ztunnel leaves L7 rules to the waypoint), whether or not A has
//!   endpoints.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tests::config::Service;
use tests::http_apps::{Http1Client, HttpMode};
use tests::l7mesh::{L7Mesh, PodSpec};
use tests::netns::Netns;
use tests::support::within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Denies `/admin` and everything under it on the echo endpoints.
const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-deny-admin, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin", "/admin/*"]
"#;

/// Sends one raw HTTP/1.1 request line (the path byte for byte, as an attacker would) and
/// returns the status code and the body.
async fn raw_get(ns: &Netns, addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = within(10, "connect", ns.connect(addr)).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    within(30, path, s.read_to_end(&mut buf)).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_spellings_cannot_bypass_a_deny_on_admin() {
    let mesh = L7Mesh::builder("hz-path")
        .document(DENY_ADMIN)
        .start()
        .await
        .unwrap();
    let servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let a = &mesh.pod("a").ns;

    // A normal path works, and the endpoint sees the normalized path with the query untouched.
    let (status, body) = raw_get(a, mesh.vip(), "/public/./x/..//y?q=/../admin&r=%2F").await;
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(info["path"], "/public/y?q=/../admin&r=%2F", "{info}");

    for path in [
        "/admin",
        "//admin",
        "///admin/",
        "/./admin",
        "/%61dmin",
        "/%61%64%6D%69%6E/x",
        "/x/../admin",
        "/x/%2e%2e/admin",
        "/../admin",
        "/public/../../admin/x",
        "/admin/./x",
        "/admin//x?y=1",
    ] {
        let (status, body) = raw_get(a, mesh.vip(), path).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body.trim(), "RBAC: access denied", "{path}");
    }
    // Escaped slashes and backslashes are refused outright (400), like malformed escapes.
    for path in [
        "/admin%2Fx",
        "/admin%2fx",
        "/admin%5Cx",
        "/%2e%2e%5cadmin",
        "/a%zz",
    ] {
        let (status, body) = raw_get(a, mesh.vip(), path).await;
        assert_eq!(status, 400, "{path}: {body}");
    }
    // A raw backslash is a slash (or, if the HTTP parser refuses it, a 400): never a 200.
    for path in ["/x\\..\\admin", "/admin\\x", "\\admin"] {
        let (status, body) = raw_get(a, mesh.vip(), path).await;
        assert!(matches!(status, 400 | 403), "{path}: {status} {body}");
    }

    // None of the denied requests reached the endpoint.
    let seen: Vec<String> = servers[0].records().into_iter().map(|r| r.path).collect();
    assert_eq!(
        seen,
        vec!["/public/y?q=/../admin&r=%2F".to_string()],
        "{seen:?}"
    );
}

const B_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

/// Service A (`echo`) routes `/b` to service `bsvc`, whose pod `d` has a DENY on `/b/secret`.
const ROUTE_TO_B: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo-to-b, namespace: default}
spec:
  hosts: [echo.default.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /b}}]
    route: [{destination: {host: bsvc.default.svc.cluster.local, port: {number: 8080}}}]
  - route: [{destination: {host: echo.default.svc.cluster.local}}]
"#;

const B_DENY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-deny-secret, namespace: default}
spec:
  selector: {matchLabels: {app: bsvc}}
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/b/secret", "/b/secret/*"]
"#;

/// Starts the two-service mesh: A = echo (endpoints `a_endpoints`), B = bsvc with pod `d`, both
/// behind the waypoint.
async fn two_services(label: &str, a_endpoints: &[&str]) -> L7Mesh {
    let builder = L7Mesh::builder(label)
        .endpoints(a_endpoints)
        .other_pod(PodSpec::new("d", &[("app", "bsvc")]));
    let wp = builder.waypoint_ip();
    builder
        .extra_service(
            Service::new("bsvc", &B_VIP.to_string())
                .port(8080, 9000)
                .waypoint(wp, 15006),
            &["d"],
        )
        .document(ROUTE_TO_B)
        .document(B_DENY)
        .start()
        .await
        .unwrap()
}

async fn check_b_deny_enforced(mesh: &L7Mesh) {
    let d = tests::http_apps::http_server(
        &mesh.pod("d").ns,
        SocketAddr::from(([0, 0, 0, 0], 9000)),
        "d",
        HttpMode::Auto,
    )
    .unwrap();
    let mut client = within(
        10,
        "connect to A's VIP",
        Http1Client::connect(&mesh.pod("a").ns, mesh.vip()),
    )
    .await
    .unwrap();
    // The route works: an allowed path reaches B's pod.
    let ok = within(30, "GET /b/ok", client.get("/b/ok", &[]))
        .await
        .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.pod(), "d", "{}", ok.text());
    // B's DENY applies to the request the route sends to B's pod.
    for path in ["/b/secret", "/b/secret/x", "/b//secret"] {
        let r = within(30, path, client.get(path, &[])).await.unwrap();
        assert_eq!(r.status, 403, "{path}: {}", r.text());
        assert_eq!(r.text().trim(), "RBAC: access denied");
    }
    let wp = mesh.waypoint();
    let lines = wp
        .wait_access_log(4, Duration::from_secs(10), |_| true)
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", wp.log_tail(20)));
    assert!(
        lines
            .iter()
            .any(|e| e["path"] == "/b/secret" && e["response_code"] == 403),
        "{lines:?}"
    );
    let seen: Vec<String> = d.records().into_iter().map(|r| r.path).collect();
    assert_eq!(seen, vec!["/b/ok".to_string()], "B's pod saw {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_to_another_service_is_authorized_against_its_pods() {
    let mesh = two_services("hz-xsvc", &["b"]).await;
    let _a = mesh.start_http_servers(HttpMode::Auto).unwrap();
    check_b_deny_enforced(&mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_from_a_service_without_endpoints_is_authorized_too() {
    let mesh = two_services("hz-xsvc0", &[]).await;
    check_b_deny_enforced(&mesh).await;
}
