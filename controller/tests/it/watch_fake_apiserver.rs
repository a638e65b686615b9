//! The watchers and the index against the in-process fake API server: the fixture cluster
//! appears as workloads; a pod deletion and a deletion hidden by an expired watch (410, then
//! a re-list) both converge.

use controller::index::{Index, IndexEvent, Kind};
use controller::watch::{run_watchers, CUSTOM_KINDS};
use fake_apiserver::FakeApiServer;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::mpsc;

const V10_A: &str = "Kubernetes//Pod/default/demoappv10-7c9d8f6b5-4kq2x";
const V10_B: &str = "Kubernetes//Pod/default/demoappv10-7c9d8f6b5-9zt7m";

struct Feed {
    rx: mpsc::Receiver<IndexEvent>,
    index: Index,
    synced: BTreeSet<Kind>,
}

impl Feed {
    /// Applies events until `done` holds (panics after 30 s).
    async fn until(&mut self, what: &str, done: impl Fn(&Feed) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done(self) {
            let ev = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("watchers running");
            if let IndexEvent::Synced(k) = &ev {
                self.synced.insert(*k);
            }
            self.index.handle(ev);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_feed_the_index_and_converge_after_delete_and_expiry() {
    let server = FakeApiServer::start().await;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/k8s-fixtures/demoapp-cluster.yaml");
    let fixture = std::fs::read_to_string(&path).expect("fixture beside the checkout");
    server.apply_yaml(&fixture).expect("fixture applies");

    let (tx, rx) = mpsc::channel(1024);
    let watchers = tokio::spawn(run_watchers(server.client(), tx));
    let mut feed = Feed {
        rx,
        index: Index::default(),
        synced: BTreeSet::new(),
    };
    let all_kinds = 6 + CUSTOM_KINDS.len();
    feed.until("every kind listed", |f| f.synced.len() == all_kinds)
        .await;
    let index = &feed.index;
    let hbone = index
        .workloads()
        .values()
        .filter(|w| w.protocol == common::model::Protocol::Hbone)
        .count();
    assert_eq!(hbone, 5, "{:?}", index.workloads().keys());
    assert!(index
        .workloads()
        .contains_key("Kubernetes//Pod/other/legacy-0"));
    assert!(index.workloads().contains_key(
        "Kubernetes/discovery.k8s.io/EndpointSlice/default/external-db-8h2kd/10.250.0.10"
    ));
    assert_eq!(
        index.services()["default/demoapp.default.svc.cluster.local"].vips,
        vec!["/10.96.0.20"]
    );
    assert_eq!(
        index.workloads()[V10_A]
            .services
            .get("default/demoapp-web.default.svc.cluster.local"),
        Some(&[(80, 8080)].into())
    );

    // A pod deleted through the API leaves the index.
    server
        .delete("v1", "Pod", Some("default"), "demoappv10-7c9d8f6b5-4kq2x")
        .expect("delete");
    feed.until("the deleted pod to go", |f| {
        !f.index.workloads().contains_key(V10_A)
    })
    .await;

    // A deletion while the watch is cut off and history is compacted: the watch expires
    // (410), the watcher re-lists, and the pod missing from the new list is deleted.
    server.pause_watches();
    server
        .delete("v1", "Pod", Some("default"), "demoappv10-7c9d8f6b5-9zt7m")
        .expect("delete");
    server.compact();
    server.resume_watches();
    feed.until("the pod deleted during the gap to go", |f| {
        !f.index.workloads().contains_key(V10_B)
    })
    .await;
    assert!(server.expired_watches() >= 1, "the watch expired");
    assert!(feed
        .index
        .workloads()
        .contains_key("Kubernetes//Pod/default/demoappv10-7c9d8f6b5-b8wqd"));
    watchers.abort();
}
