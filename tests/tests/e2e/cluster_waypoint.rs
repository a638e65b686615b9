//! Waypoints the Kubernetes way, end to end: a `Gateway` of class `istio-waypoint` in the fake
//! API server, the real controller creating the waypoint's Service, two waypoint pods running
//! the real `waypoint` binary on xDS and the controller's CA, a Service bound with
//! `istio.io/use-waypoint`, and the users' own `demoapp-canary.yaml` / `demoapp-weights.yaml`
//! applied unchanged. Traffic from a client pod is routed by the waypoints, both waypoint pods
//! carry it, the Gateway reports `Programmed`, and when no waypoint pod is ready traffic is
//! refused (never sent around the waypoint) with the reason in ztunnel's access log and on the
//! Gateway. A ServiceEntry labelled for the waypoint is routed by it too.

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tests::cluster::{namespace, pod, ClusterMesh};
use tests::http_apps::{empty_body, http_server, request, Http1Client, HttpMode, HttpServer};
use tests::scenarios::scenario;
use tests::support::{any, within};
use tests::topology::Topology;
use tests::waypoint::{WaypointOpts, WaypointProcess};

const DEMOAPP_VIP: &str = "10.96.0.30";
const WAYPOINT_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// n1: client `a` (10.244.1.2) and waypoint pod `wp-b` (.3); n2: waypoint pod `wp-a`
/// (10.244.2.2), demoapp v1.0 (.3, .4) and v1.1 (.5).
fn topology() -> Topology {
    Topology::builder()
        .node("n1", &["a", "wp-b"])
        .node("n2", &["wp-a", "v10-1", "v10-2", "v11-1"])
        .build()
        .unwrap()
}

const DEMO_PODS: [(&str, &str, &str); 3] = [
    ("v10-1", "10.244.2.3", "v1.0"),
    ("v10-2", "10.244.2.4", "v1.0"),
    ("v11-1", "10.244.2.5", "v1.1"),
];
const WAYPOINT_PODS: [(&str, &str, &str); 2] =
    [("wp-a", "10.244.2.2", "n2"), ("wp-b", "10.244.1.3", "n1")];

fn endpoint(pod: &str, ip: &str, node: &str, ready: bool) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": false},
           "nodeName": node, "targetRef": {"kind": "Pod", "namespace": "default", "name": pod}})
}

fn objects() -> Vec<Value> {
    let mut o = vec![
        namespace("default", true),
        pod(
            "default",
            "a",
            "sleep",
            "n1",
            "10.244.1.2",
            &[("app", "sleep")],
        ),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "demoapp", "namespace": "default",
                         "labels": {"istio.io/use-waypoint": "waypoint"}},
            "spec": {"clusterIP": DEMOAPP_VIP, "clusterIPs": [DEMOAPP_VIP],
                     "selector": {"app": "demoapp"},
                     "ports": [{"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]}
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "demoapp-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "demoapp"}},
            "addressType": "IPv4",
            "endpoints": DEMO_PODS.iter().map(|(p, ip, _)| endpoint(p, ip, "n2", true)).collect::<Vec<_>>(),
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }),
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "default"},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
        }),
    ];
    for (name, ip, version) in DEMO_PODS {
        o.push(pod(
            "default",
            name,
            "demoapp",
            "n2",
            ip,
            &[("app", "demoapp"), ("version", version)],
        ));
    }
    for (name, ip, node) in WAYPOINT_PODS {
        o.push(waypoint_pod(name, ip, node, true));
    }
    o
}

/// A pod of the waypoint (labelled with its Gateway), Ready or not as the kubelet reports it.
fn waypoint_pod(name: &str, ip: &str, node: &str, ready: bool) -> Value {
    let mut p = pod(
        "default",
        name,
        "waypoint",
        node,
        ip,
        &[(WAYPOINT_LABEL, "waypoint")],
    );
    if !ready {
        p["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    }
    p
}

/// The waypoint's EndpointSlice as the endpoint controller writes it, pods ready or not.
fn waypoint_slice(ready: bool) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "waypoint-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "waypoint"}},
        "addressType": "IPv4",
        "endpoints": WAYPOINT_PODS.iter().map(|(p, ip, n)| endpoint(p, ip, n, ready)).collect::<Vec<_>>(),
        "ports": [{"name": "mesh", "port": 15008, "protocol": "TCP"},
                  {"name": "hbone", "port": 15006, "protocol": "TCP"},
                  {"name": "status-port", "port": 15021, "protocol": "TCP"}]
    })
}

/// A STATIC entry bound to the waypoint by its own label; its endpoint is outside the mesh.
const ENTRY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: payments
  namespace: default
  labels: {istio.io/use-waypoint: waypoint}
spec:
  hosts: [payments.example.com]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8081}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 10.0.0.2}]
"#;

fn condition(gw: &Value, kind: &str) -> (String, String) {
    gw["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .unwrap_or_default()
}

async fn wait_gateway(mesh: &ClusterMesh, status: &str, reason: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let gw = mesh
            .api
            .get(
                "gateway.networking.k8s.io/v1",
                "Gateway",
                Some("default"),
                "waypoint",
            )
            .expect("the Gateway exists");
        let got = condition(&gw, "Programmed");
        if got == (status.to_string(), reason.to_string()) {
            return gw;
        }
        assert!(
            Instant::now() < deadline,
            "Programmed never became {status}/{reason}: {}",
            gw["status"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET path` on a fresh connection from `a` to the demoapp VIP: (status, serving pod, path
/// the pod saw), or the error.
async fn get(mesh: &ClusterMesh, path: &str) -> anyhow::Result<(u16, String, String)> {
    let vip: SocketAddr = format!("{DEMOAPP_VIP}:8080").parse()?;
    let mut c = Http1Client::connect(&mesh.pod("a").ns, vip).await?;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.send(request("GET", path, &[], empty_body())),
    )
    .await??;
    let json = r.json().unwrap_or_default();
    Ok((
        r.status,
        json["pod"].as_str().unwrap_or("").to_string(),
        json["path"].as_str().unwrap_or("").to_string(),
    ))
}

async fn start_waypoint(mesh: &ClusterMesh, name: &str, node: &str) -> WaypointProcess {
    let mut args = mesh.control_plane_args(name).unwrap();
    args.extend(["--node".to_string(), node.to_string()]);
    let opts = WaypointOpts::cluster(&format!("default/{name}"), args);
    let log = mesh.dir.join(&format!("{name}.log"));
    within(
        60,
        "waypoint ready",
        WaypointProcess::start(&mesh.pod(name).ns, &opts, &log),
    )
    .await
    .unwrap()
}

fn start_apps(mesh: &ClusterMesh) -> Vec<HttpServer> {
    DEMO_PODS
        .iter()
        .map(|(name, _, _)| {
            http_server(&mesh.pod(name).ns, any(8080), name, HttpMode::Auto).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_waypoint_routes_users_yaml_over_all_ready_pods_and_fails_closed() {
    let mesh = within(
        120,
        "start the cluster mesh",
        ClusterMesh::start_in("cluster-wp", topology(), objects()),
    )
    .await
    .unwrap();
    for (name, _, _) in WAYPOINT_PODS {
        mesh.api.add_token(
            &tests::cluster::token_of(name),
            tests::cluster::token_info("default", "waypoint", name),
        );
    }
    // The users' routing, unchanged (applied in the default namespace, as `kubectl apply`).
    mesh.api
        .apply_yaml(&scenario("demoapp-canary.yaml"))
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .unwrap();
    let _apps = start_apps(&mesh);

    // The controller creates the waypoint's Service; no pod is ready yet: not Programmed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while mesh
        .api
        .get("v1", "Service", Some("default"), "waypoint")
        .is_none()
    {
        assert!(Instant::now() < deadline, "no waypoint Service created");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    mesh.create(waypoint_slice(false)).unwrap();

    let _wp_a = start_waypoint(&mesh, "wp-a", "n2").await;
    let _wp_b = start_waypoint(&mesh, "wp-b", "n1").await;

    // Both waypoint pods ready (the kubelet's and the endpoint controller's part).
    mesh.update(waypoint_slice(true)).unwrap();
    wait_gateway(&mesh, "True", "Programmed").await;

    // demoapp-canary.yaml through the waypoints: `/canary` → v1.1 with the path rewritten,
    // everything else → v1.0.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match get(&mesh, "/canary").await {
            Ok((200, pod, path)) if pod.starts_with("v11-") => {
                assert_eq!(path, "/");
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "/canary never routed to v1.1: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for i in 0..20 {
        let (status, pod, path) = get(&mesh, &format!("/page/{i}")).await.unwrap();
        assert_eq!(status, 200);
        assert!(pod.starts_with("v10-"), "/page/{i} answered by {pod}");
        assert_eq!(path, format!("/page/{i}"));
        let (status, pod, _) = get(&mesh, "/canary").await.unwrap();
        assert_eq!((status, pod.starts_with("v11-")), (200, true), "{pod}");
    }
    // Both waypoint pods carried requests (ztunnel spreads over the waypoint's ready pods).
    for wp in [&_wp_a, &_wp_b] {
        let served = wp.access_log_lines().len();
        assert!(served > 0, "waypoint {} served nothing", wp.name);
    }

    // demoapp-weights.yaml replaces the route: about 90/10.
    mesh.api
        .apply_yaml(&scenario("demoapp-weights.yaml"))
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&mesh, "/canary").await.ok().map(|r| r.2) != Some("/canary".to_string()) {
        assert!(Instant::now() < deadline, "weights never applied");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (mut v10, mut v11) = (0, 0);
    for i in 0..200 {
        let (status, pod, _) = get(&mesh, &format!("/w/{i}")).await.unwrap();
        assert_eq!(status, 200);
        if pod.starts_with("v10-") {
            v10 += 1;
        } else if pod.starts_with("v11-") {
            v11 += 1;
        }
    }
    assert_eq!(v10 + v11, 200);
    assert!(
        (160..=195).contains(&v10) && v11 >= 5,
        "90/10 split: v1.0 {v10}, v1.1 {v11}"
    );

    // A ServiceEntry labelled for the waypoint: its host goes through the waypoints, which
    // reach its endpoint outside the mesh (node n2's address) themselves.
    let outside = http_server(
        &mesh.topo.node("n2").ns,
        "10.0.0.2:8081".parse().unwrap(),
        "outside",
        HttpMode::Auto,
    )
    .unwrap();
    mesh.api
        .apply_yaml(ENTRY)
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let vip = loop {
        if let Ok(ip) = mesh.ztunnel("n1").service_vip("payments.example.com").await {
            break SocketAddr::new(ip, 80);
        }
        assert!(Instant::now() < deadline, "the entry never reached ztunnel");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = async {
            let mut c = Http1Client::connect(&mesh.pod("a").ns, vip).await?;
            c.host = "payments.example.com".into();
            tokio::time::timeout(Duration::from_secs(5), c.get("/pay", &[])).await?
        }
        .await;
        match r {
            Ok(r) if r.status == 200 => {
                assert_eq!(r.header("x-pod"), Some("outside"));
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "payments.example.com never served: {:?}",
                other.map(|r| (r.status, r.text()))
            ),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let waypoint_ips: Vec<String> = WAYPOINT_PODS.iter().map(|w| w.1.to_string()).collect();
    for r in outside.records() {
        assert!(
            waypoint_ips.contains(&r.peer.ip().to_string()),
            "the entry's endpoint was reached from {} (not a waypoint)",
            r.peer
        );
    }

    // No waypoint pod ready: traffic is refused, not sent straight to demoapp around the
    // waypoint's routes and L7 policy; the reason is in n1's access log and on the Gateway.
    for (name, ip, node) in WAYPOINT_PODS {
        mesh.update(waypoint_pod(name, ip, node, false)).unwrap();
    }
    mesh.update(waypoint_slice(false)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&mesh, "/switching").await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still served without a ready waypoint pod"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    mesh.ztunnel("n1")
        .wait_log_line(
            &["waypoint.default.svc.cluster.local", "no ready pod"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        assert!(get(&mesh, "/closed").await.is_err());
    }
    let gw = wait_gateway(&mesh, "False", "AddressNotUsable").await;
    assert!(
        gw["status"].to_string().contains("no ready waypoint pod"),
        "{}",
        gw["status"]
    );
    assert!(
        _apps
            .iter()
            .flat_map(|a| a.records())
            .all(|r| r.path != "/closed"),
        "a request reached demoapp without the waypoint"
    );
}
