//! The whole control-plane path with no local config file: the fake API server (real HTTP
//! list/watch) seeded with the demoapp cluster fixture, the controller's watchers and index, the
//! ADS server on loopback, and the proxies' real xDS client (`common::xds::client`) building a
//! data-plane snapshot. Checks what a ztunnel ends up with, and that deletes, 410 re-lists and
//! reconnects reach it.

use common::config::watch::ConfigStore;
use common::model::Protocol;
use common::xds::client::{XdsClient, XdsConfig as ClientConfig};
use controller::index::{Index, IndexConfig};
use controller::xds::{ServeConfig, XdsServer};
use fake_apiserver::FakeApiServer;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FIXTURE: &str = include_str!("../../../../shared/k8s-fixtures/demoapp-cluster.yaml");
const WAIT: Duration = Duration::from_secs(20);

struct Plane {
    api: FakeApiServer,
    xds: XdsServer,
    addr: std::net::SocketAddr,
}

async fn control_plane(serve_cfg: ServeConfig) -> Plane {
    control_plane_with(super::xds_server::cfg(20, 200), serve_cfg).await
}

async fn control_plane_with(xds_cfg: controller::xds::XdsConfig, serve_cfg: ServeConfig) -> Plane {
    let api = FakeApiServer::start().await;
    api.apply_yaml(FIXTURE).expect("fixture loads");
    let xds = XdsServer::new(xds_cfg, None);
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let (synced_tx, mut synced) = tokio::sync::watch::channel(false);
    tokio::spawn(controller::watch::run_watchers(api.client(), tx));
    tokio::spawn(controller::feed::feed(
        rx,
        Index::new(IndexConfig::default()),
        xds.clone(),
        synced_tx,
    ));
    tokio::time::timeout(WAIT, synced.wait_for(|s| *s))
        .await
        .expect("core kinds listed in time")
        .expect("feed alive");
    let addr = super::xds_server::start_with(&xds, serve_cfg).await;
    Plane { api, xds, addr }
}

fn proxy(
    plane: &Plane,
) -> (
    Arc<ConfigStore>,
    Arc<AtomicBool>,
    tokio::task::JoinHandle<()>,
) {
    let cfg = ClientConfig {
        address: format!("http://{}", plane.addr),
        root_cert: None,
        server_name: None,
        token: None,
        cluster_id: "Kubernetes".into(),
        node_id: "ztunnel~10.0.0.1~ztunnel-x.istio-system~istio-system.svc.cluster.local".into(),
        metadata: [("NODE_NAME".to_string(), "node-1".to_string())].into(),
        types: ClientConfig::default_types(true),
    };
    let store = Arc::new(ConfigStore::default());
    let ready = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(XdsClient::new(cfg, store.clone(), ready.clone()).run());
    (store, ready, task)
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn pod(plane: &Plane, name: &str) -> serde_json::Value {
    plane
        .api
        .get("v1", "Pod", Some("default"), name)
        .unwrap_or_else(|| panic!("fixture pod {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_pods_reach_a_proxy_as_workloads_and_changes_follow() {
    let plane = control_plane(ServeConfig::default()).await;
    let (store, ready, _task) = proxy(&plane);
    wait_until("every type ACKed", || ready.load(Ordering::Acquire)).await;
    // The initial sync builds one snapshot from all three types, not one per type.
    assert_eq!(store.generation(), 1, "snapshots built by the initial sync");
    wait_until("demoapp workloads", || {
        store.current().workload_by_ip(ip("10.244.1.10")).is_some()
    })
    .await;
    let snap = store.current();

    // An ambient pod: an HBONE workload with node, service account, labels and its service.
    let v10 = pod(&plane, "demoappv10-7c9d8f6b5-4kq2x");
    let v10_ip: IpAddr = ip(v10["status"]["podIP"].as_str().expect("podIP"));
    let w = snap
        .workload_by_ip(v10_ip)
        .expect("demoapp v1.0 pod is a workload");
    assert_eq!(w.protocol, Protocol::Hbone);
    assert_eq!(w.uid, "Kubernetes//Pod/default/demoappv10-7c9d8f6b5-4kq2x");
    assert_eq!(w.node, v10["spec"]["nodeName"].as_str().expect("nodeName"));
    assert_eq!(w.service_account, "default");
    assert_eq!(w.labels.get("app").map(String::as_str), Some("demoapp"));
    assert!(
        w.services
            .contains_key("default/demoapp.default.svc.cluster.local"),
        "endpoint of demoapp: {:?}",
        w.services
    );
    // The service, with its VIP and port, reachable by VIP.
    let svc = snap
        .service_by_key("default/demoapp.default.svc.cluster.local")
        .expect("demoapp service");
    let vip = snap.service_by_vip(ip("10.96.0.20")).expect("VIP indexed");
    assert_eq!(vip.hostname, svc.hostname);
    assert!(!snap.endpoints(svc, 8080).is_empty(), "endpoints on 8080");

    // Opted out (redirection disabled) and non-ambient pods are plain TCP workloads.
    let proxy_pod = pod(&plane, "proxy-6d4c8b7f9-jx5tw");
    let proxy_ip = ip(proxy_pod["status"]["podIP"].as_str().expect("podIP"));
    assert_eq!(
        snap.workload_by_ip(proxy_ip).map(|w| w.protocol),
        Some(Protocol::Tcp)
    );
    let legacy = plane
        .api
        .get("v1", "Pod", Some("other"), "legacy-0")
        .expect("legacy pod");
    let legacy_ip = ip(legacy["status"]["podIP"].as_str().expect("podIP"));
    assert_eq!(
        snap.workload_by_ip(legacy_ip).map(|w| w.protocol),
        Some(Protocol::Tcp)
    );

    // A deleted pod disappears from the proxy.
    plane
        .api
        .delete("v1", "Pod", Some("default"), "demoappv10-7c9d8f6b5-4kq2x")
        .expect("delete");
    wait_until("the deleted pod to leave the proxy", || {
        store.current().workload_by_ip(v10_ip).is_none()
    })
    .await;

    // A delete during a watch gap followed by a 410: the re-list removes it from the proxy too.
    let v11 = pod(&plane, "demoappv11-5b6f7d9c4-p2lrn");
    let v11_ip = ip(v11["status"]["podIP"].as_str().expect("podIP"));
    assert!(store.current().workload_by_ip(v11_ip).is_some());
    plane.api.pause_watches();
    plane
        .api
        .delete("v1", "Pod", Some("default"), "demoappv11-5b6f7d9c4-p2lrn")
        .expect("delete");
    plane.api.compact();
    plane.api.resume_watches();
    wait_until("the re-list to remove the pod deleted in the gap", || {
        store.current().workload_by_ip(v11_ip).is_none()
    })
    .await;
    assert!(
        plane.api.expired_watches() > 0,
        "the watch really expired (410)"
    );

    // A new pod in the ambient namespace appears.
    let mut fresh = v10.clone();
    fresh["metadata"] = serde_json::json!({
        "name": "demoappv10-new", "namespace": "default",
        "labels": v10["metadata"]["labels"].clone(),
    });
    fresh["status"]["podIP"] = "10.244.1.77".into();
    fresh["status"]["podIPs"] = serde_json::json!([{"ip": "10.244.1.77"}]);
    plane.api.create(fresh).expect("create pod");
    wait_until("the new pod", || {
        store
            .current()
            .workload_by_ip(ip("10.244.1.77"))
            .is_some_and(|w| w.protocol == Protocol::Hbone)
    })
    .await;
    assert!(plane.xds.resource_count(common::xds::ADDRESS_TYPE) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_proxy_keeps_its_config_and_converges() {
    // The server ends every connection after ~1 s (max connection age), so the same client
    // reconnects with initial_resource_versions again and again.
    let plane = control_plane(ServeConfig {
        max_connection_age: Some(Duration::from_secs(1)),
        max_connection_age_jitter: 0.0,
        grace: Duration::from_millis(200),
        ..ServeConfig::default()
    })
    .await;
    let (store, ready, _task) = proxy(&plane);
    wait_until("ready", || ready.load(Ordering::Acquire)).await;
    let before = store.current().workloads.len();
    assert!(before > 0);
    let gone = pod(&plane, "demoappv10-7c9d8f6b5-9zt7m");
    let gone_ip = ip(gone["status"]["podIP"].as_str().expect("podIP"));
    // Let at least one reconnect happen, then remove a pod.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        store.current().workloads.len(),
        before,
        "nothing lost across the reconnect"
    );
    plane
        .api
        .delete("v1", "Pod", Some("default"), "demoappv10-7c9d8f6b5-9zt7m")
        .expect("delete");
    wait_until("converged", || {
        store.current().workload_by_ip(gone_ip).is_none()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(store.current().workloads.len(), before - 1);
}

/// A ServiceEntry reaches the proxy twice: as the config resource our proxies register it
/// from, and as Istio Address resources (for an Istio ztunnel), which ours skip — one service,
/// no stray workloads, nothing NACKed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_entries_register_once_though_also_sent_as_addresses() {
    let plane = control_plane(ServeConfig::default()).await;
    let (store, ready, _task) = proxy(&plane);
    wait_until("every type ACKed", || ready.load(Ordering::Acquire)).await;
    plane
        .api
        .apply_yaml(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {name: db, namespace: default}\n\
             spec:\n  hosts: [db.example.com]\n  addresses: [240.0.0.10]\n  \
             resolution: STATIC\n  location: MESH_EXTERNAL\n  \
             ports: [{number: 5432, name: tcp, protocol: TCP}]\n  \
             endpoints: [{address: 192.0.2.7}]\n",
        )
        .expect("entry applies");
    wait_until("the entry's service", || {
        store.current().service_by_vip(ip("240.0.0.10")).is_some()
    })
    .await;
    assert!(
        plane
            .xds
            .resource_names(common::xds::ADDRESS_TYPE)
            .iter()
            .any(|n| n.contains("/networking.istio.io/ServiceEntry/default/db/")),
        "the endpoint is in the Address feed"
    );
    let snap = store.current();
    let matching: Vec<_> = snap
        .services
        .iter()
        .filter(|s| s.hostname == "db.example.com")
        .collect();
    assert_eq!(matching.len(), 1, "{matching:?}");
    assert!(
        matching[0].service_entry.is_some(),
        "registered from the entry"
    );
    assert!(snap.rejected.is_empty(), "{:?}", snap.rejected);
    let ep = snap
        .workload_by_ip(ip("192.0.2.7"))
        .expect("the endpoint is a workload");
    assert!(
        !ep.uid.contains("networking.istio.io"),
        "the proxy's own endpoint workload, not the feed's: {}",
        ep.uid
    );
}

/// A first response split in parts (here ~1 KiB each) is applied as one: readiness only after
/// the last part, one snapshot, every workload in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_response_in_parts_builds_one_complete_snapshot() {
    let xds_cfg = controller::xds::XdsConfig {
        chunk_bytes: 1024,
        ..super::xds_server::cfg(20, 200)
    };
    let plane = control_plane_with(xds_cfg, ServeConfig::default()).await;
    let pods: Vec<String> = plane
        .xds
        .resource_names(common::xds::ADDRESS_TYPE)
        .into_iter()
        .filter(|n| n.contains("//Pod/"))
        .collect();
    assert!(pods.len() > 5, "enough to need parts: {pods:?}");
    let (store, ready, _task) = proxy(&plane);
    wait_until("every type ACKed", || ready.load(Ordering::Acquire)).await;
    assert_eq!(store.generation(), 1, "one snapshot for all the parts");
    let snap = store.current();
    for uid in &pods {
        assert!(
            snap.workloads.iter().any(|w| &w.uid == uid),
            "{uid} missing from the snapshot"
        );
    }
}

/// Istio ztunnel's on-demand mode against the real pipeline: subscribed to nothing, it gets
/// the workloads of its own node; a `<network>/<ip>` key comes back under that key (a pod's
/// address, or a Service VIP with the service's workloads); an unknown one as removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_clients_get_their_node_and_what_they_ask_for() {
    use common::xds::discovery::{DeltaDiscoveryRequest, Node};
    use common::xds::workload::{address::Type, Address};
    use prost::Message;
    let plane = control_plane(ServeConfig::default()).await;
    let node = Node {
        id: "ztunnel~10.0.0.2~ztunnel-y.istio-system~istio-system.svc.cluster.local".into(),
        metadata: Some(prost_types::Struct {
            fields: [(
                "NODE_NAME".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("node-2".into())),
                },
            )]
            .into(),
        }),
        ..Default::default()
    };
    let sub = |keys: &[&str]| DeltaDiscoveryRequest {
        type_url: common::xds::ADDRESS_TYPE.into(),
        resource_names_subscribe: keys.iter().map(|k| k.to_string()).collect(),
        ..Default::default()
    };
    let mut first = sub(&["*"]);
    first.resource_names_unsubscribe = vec!["*".into()];
    first.node = Some(node);
    let mut c = super::xds_server::Client::open(plane.addr, vec![first]).await;
    let decode = |r: &common::xds::discovery::Resource| {
        let any = r.resource.as_ref().expect("resource body");
        Address::decode(any.value.as_slice())
            .expect("an Address")
            .r#type
            .expect("workload or service")
    };
    let workload = |t: &Type| match t {
        Type::Workload(w) => (w.name.clone(), w.node.clone()),
        Type::Service(s) => panic!("unexpected service {}", s.hostname),
    };

    let r = c.recv().await;
    assert!(!r.resources.is_empty(), "node-2 has pods");
    for res in &r.resources {
        let (name, node) = workload(&decode(res));
        assert_eq!(node, "node-2", "{name} is not on the client's node");
        assert!(
            res.name.starts_with("Kubernetes//Pod/") && res.name.ends_with(&format!("/{name}")),
            "{} is named by its uid",
            res.name
        );
    }
    c.ack(&r).await;

    // A pod of the other node, by address: answered under the key asked for.
    c.send(sub(&["/10.244.1.10"])).await;
    let r = c.recv().await;
    assert_eq!(r.resources.len(), 1, "{:?}", r.resources);
    assert_eq!(r.resources[0].name, "/10.244.1.10");
    assert_eq!(
        workload(&decode(&r.resources[0])).0,
        "demoappv10-7c9d8f6b5-4kq2x"
    );
    c.ack(&r).await;

    // A Service VIP: the service under the key, with the workloads behind it it lacked.
    c.send(sub(&["/10.96.0.20"])).await;
    let r = c.recv().await;
    let vip = r
        .resources
        .iter()
        .find(|res| res.name == "/10.96.0.20")
        .expect("the service under its VIP key");
    assert!(
        matches!(decode(vip), Type::Service(s) if s.hostname == "demoapp.default.svc.cluster.local")
    );
    let behind: Vec<String> = r
        .resources
        .iter()
        .filter(|res| res.name != "/10.96.0.20")
        .map(|res| workload(&decode(res)).1)
        .collect();
    assert!(!behind.is_empty(), "the service's workloads come along");
    assert!(
        behind.iter().all(|n| n == "node-1"),
        "node-2's it already had: {behind:?}"
    );
    c.ack(&r).await;

    // Nobody's address.
    c.send(sub(&["/10.9.9.9"])).await;
    let r = c.recv().await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, vec!["/10.9.9.9"]);
}
