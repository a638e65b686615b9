//! Kubernetes Events about Istio objects, end to end: the fake API server (real HTTP), two
//! controller replicas electing a leader on the real Lease, each with its watchers, index, feed,
//! ADS server and Event writer, and a proxy's real xDS client on the leader. An invalid
//! VirtualService gets a Warning `Rejected` Event (and `NackedByProxy` from the proxy refusing
//! it), a valid one gets none and still reaches the proxy, fixing the invalid one yields one
//! Normal `Accepted` and no new Warning. The follower writes no verdicts, but does report the
//! NACK of the proxy connected to it (no other replica sees that NACK).

use common::config::watch::ConfigStore;
use common::snapshot::Snapshot;
use common::xds::client::{XdsClient, XdsConfig as ClientConfig};
use common::xds::CONFIG_TYPE;
use controller::events::plan::Verdicts;
use controller::events::EventsConfig;
use controller::index::{Index, IndexConfig};
use controller::leader;
use controller::xds::{ServeConfig, XdsServer};
use fake_apiserver::FakeApiServer;
use serde_json::{json, Value};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

const FIXTURE: &str = include_str!("../../../../shared/k8s-fixtures/demoapp-cluster.yaml");
const WAIT: Duration = Duration::from_secs(30);
const NODE_ID: &str = "ztunnel~10.0.0.1~ztunnel-x.istio-system~istio-system.svc.cluster.local";

/// One controller replica: election, pipeline, Event writer, and its ADS server's address.
struct Replica {
    election: leader::Election,
    xds: XdsServer,
    addr: std::net::SocketAddr,
}

async fn replica(api: &FakeApiServer, name: &str) -> Replica {
    let client = api.client();
    let election = leader::elect(
        client.clone(),
        "ambient-system",
        leader::LEASE_NAME,
        name,
        30,
    );
    let xds = XdsServer::new(super::xds_server::cfg(20, 200), None);
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let (synced_tx, mut synced) = tokio::sync::watch::channel(false);
    let (verdicts_tx, verdicts) = tokio::sync::watch::channel(Arc::new(Verdicts::new()));
    tokio::spawn(controller::events::run(
        client.clone(),
        EventsConfig {
            instance: name.to_string(),
            ..EventsConfig::default()
        },
        election.is_leader.clone(),
        verdicts,
        xds.nack_reports(64),
    ));
    tokio::spawn(controller::watch::run_watchers(client, tx));
    tokio::spawn(controller::feed::feed_with_verdicts(
        rx,
        Index::new(IndexConfig::default()),
        xds.clone(),
        synced_tx,
        verdicts_tx,
    ));
    tokio::time::timeout(WAIT, synced.wait_for(|s| *s))
        .await
        .expect("listed in time")
        .expect("feed alive");
    let addr = super::xds_server::start_with(&xds, ServeConfig::default()).await;
    Replica {
        election,
        xds,
        addr,
    }
}

fn proxy(addr: std::net::SocketAddr) -> (Arc<ConfigStore>, tokio::task::JoinHandle<()>) {
    let cfg = ClientConfig {
        address: format!("http://{addr}"),
        root_cert: None,
        server_name: None,
        token: None,
        cluster_id: "Kubernetes".into(),
        node_id: NODE_ID.into(),
        metadata: [("NODE_NAME".to_string(), "node-1".to_string())].into(),
        types: ClientConfig::default_types(true),
    };
    let store = Arc::new(ConfigStore::default());
    let ready = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(XdsClient::new(cfg, store.clone(), ready).run());
    (store, task)
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn virtual_service(name: &str, weight: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"hosts": ["demoapp"], "http": [{"route": [
            {"destination": {"host": "demoapp"}, "weight": weight}]}]}})
}

/// The Events regarding `default/<name>` with `reason`.
fn events(api: &FakeApiServer, name: &str, reason: &str) -> Vec<Value> {
    api.list("events.k8s.io/v1", "Event")
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
        .collect()
}

fn routes_vs(snap: &Snapshot, vs: &str) -> bool {
    snap.l7
        .routes
        .gateways
        .values()
        .flat_map(|hosts| hosts.values())
        .flatten()
        .any(|t| t.virtual_service == vs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_objects_become_events_on_the_leader_and_nacks_on_the_proxys_replica() {
    let api = FakeApiServer::start().await;
    api.apply_yaml(FIXTURE).expect("fixture loads");
    let a = replica(&api, "replica-a").await;
    let mut leading = a.election.is_leader.clone();
    tokio::time::timeout(WAIT, leading.wait_for(|l| *l))
        .await
        .expect("replica-a leads")
        .expect("election alive");
    let b = replica(&api, "replica-b").await;
    assert!(!*b.election.is_leader.borrow(), "one leader");
    let (store, _task) = proxy(a.addr);
    let (_store_b, _task_b) = proxy(b.addr);

    api.create(virtual_service("good", json!(100)))
        .expect("create good");
    let bad = api
        .create(virtual_service("bad", json!("heavy")))
        .expect("create bad");

    wait_until("a Rejected event about the invalid VirtualService", || {
        !events(&api, "bad", "Rejected").is_empty()
    })
    .await;
    let rejected = events(&api, "bad", "Rejected");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    let ev = &rejected[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["metadata"]["namespace"], "default");
    assert_eq!(ev["regarding"]["kind"], "VirtualService");
    assert_eq!(ev["regarding"]["apiVersion"], "networking.istio.io/v1");
    assert_eq!(ev["regarding"]["uid"], bad["metadata"]["uid"]);
    let note = ev["note"].as_str().expect("note");
    assert!(note.contains("weight"), "field path in the note: {note}");
    assert_eq!(ev["reportingController"], "ambient-controller");

    // The valid one reaches the proxy; the proxy NACKs only the invalid one, and that NACK
    // becomes one NackedByProxy Event naming the proxy.
    wait_until("the valid VirtualService at the proxy", || {
        routes_vs(&store.current(), "default/good")
    })
    .await;
    assert!(!routes_vs(&store.current(), "default/bad"));
    wait_until("a NackedByProxy event", || {
        !events(&api, "bad", "NackedByProxy").is_empty()
    })
    .await;
    let nacked = events(&api, "bad", "NackedByProxy");
    assert!(
        nacked[0]["note"]
            .as_str()
            .unwrap_or_default()
            .contains(NODE_ID),
        "{nacked:?}"
    );
    assert_eq!(nacked[0]["regarding"]["uid"], bad["metadata"]["uid"]);
    assert!(a.xds.metrics().nacked_resource_count(CONFIG_TYPE) >= 1);
    // The follower's proxy NACKed too: counted there, and reported by the follower itself.
    wait_until("the follower's proxy NACK", || {
        b.xds.metrics().nacked_resource_count(CONFIG_TYPE) >= 1
    })
    .await;
    let by = |instance: &str| {
        events(&api, "bad", "NackedByProxy")
            .into_iter()
            .filter(|e| e["reportingInstance"] == instance)
            .count()
    };
    wait_until("a NackedByProxy event from the follower", || {
        by("replica-b") > 0
    })
    .await;
    assert_eq!(by("replica-a"), 1, "one per object and reason per window");
    assert_eq!(by("replica-b"), 1, "one per object and reason per window");

    // A change to the invalid object that keeps the same reason: no new Warning.
    let mut relabelled = bad.clone();
    relabelled["metadata"]["labels"] = json!({"touched": "yes"});
    api.update(relabelled).expect("relabel");
    // Fixed: one Normal Accepted, no further Rejected.
    let mut fixed = virtual_service("bad", json!(100));
    fixed["metadata"]["uid"] = bad["metadata"]["uid"].clone();
    api.update(fixed).expect("fix");
    wait_until("an Accepted event", || {
        !events(&api, "bad", "Accepted").is_empty()
    })
    .await;
    wait_until("the fixed VirtualService at the proxy", || {
        routes_vs(&store.current(), "default/bad")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rejected = events(&api, "bad", "Rejected");
    assert_eq!(rejected.len(), 1, "{rejected:#?}");
    let accepted = events(&api, "bad", "Accepted");
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(accepted[0]["type"], "Normal");

    // Nothing about the valid object, and every verdict Event from the leader.
    let all = api.list("events.k8s.io/v1", "Event");
    assert!(
        all.iter().all(|e| e["regarding"]["name"] != "good"),
        "{all:?}"
    );
    assert!(!all.is_empty());
    for e in all.iter().filter(|e| e["reason"] != "NackedByProxy") {
        assert_eq!(e["reportingInstance"], "replica-a", "{e}");
    }
}
