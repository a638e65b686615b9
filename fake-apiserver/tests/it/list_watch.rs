//! List paging, selectors, watch events, bookmarks and the 410 re-list, driven only through
//! kube::Client and kube::runtime.

use crate::support::eventually;
use fake_apiserver::FakeApiServer;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::ResourceExt;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

fn pod(name: &str, node: &str, phase: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": phase}})
}

fn cm(name: &str, v: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default"}, "data": {"v": v}})
}

/// Runs a reflector over `api` in the background; returns its store.
fn reflect(api: Api<ConfigMap>, cfg: watcher::Config) -> reflector::Store<ConfigMap> {
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, cfg))
        .default_backoff()
        .applied_objects();
    tokio::spawn(stream.for_each(|_| async {}));
    reader
}

fn contents(store: &reflector::Store<ConfigMap>) -> BTreeMap<String, String> {
    store
        .state()
        .iter()
        .map(|c| {
            let v = c
                .data
                .as_ref()
                .and_then(|d| d.get("v"))
                .cloned()
                .unwrap_or_default();
            (c.name_any(), v)
        })
        .collect()
}

#[tokio::test]
async fn list_pages_with_continue_tokens_on_a_consistent_snapshot() {
    let server = FakeApiServer::start().await;
    for i in 0..1203 {
        server.create(cm(&format!("cm-{i:04}"), "x")).unwrap();
    }
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let first = api.list(&ListParams::default().limit(500)).await.unwrap();
    assert_eq!(first.items.len(), 500);
    let token = first.metadata.continue_.clone().expect("a continue token");
    assert_eq!(first.metadata.remaining_item_count, Some(703));
    // Changes after the first page do not show in later pages of the same list.
    server
        .delete("v1", "ConfigMap", Some("default"), "cm-0900")
        .unwrap();
    server.create(cm("cm-9999", "new")).unwrap();
    let mut names: Vec<String> = first.items.iter().map(|c| c.name_any()).collect();
    let mut tok = Some(token);
    let mut pages = 1;
    while let Some(t) = tok {
        let page = api
            .list(&ListParams::default().limit(500).continue_token(&t))
            .await
            .unwrap();
        assert!(page
            .metadata
            .resource_version
            .as_deref()
            .is_some_and(|rv| !rv.is_empty()));
        names.extend(page.items.iter().map(|c| c.name_any()));
        tok = page.metadata.continue_.clone();
        pages += 1;
    }
    assert_eq!(pages, 3);
    assert_eq!(names.len(), 1203);
    assert!(names.contains(&"cm-0900".to_string()));
    assert!(!names.contains(&"cm-9999".to_string()));
    let lists: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v1/namespaces/default/configmaps")
        .collect();
    assert_eq!(lists.len(), 3);
    assert_eq!(lists[0].param("continue"), None);
    assert!(lists[1].param("continue").is_some() && lists[2].param("continue").is_some());

    // A reflector lists the same way (page size 500) and then sees the current state.
    let store = reflect(api.clone(), watcher::Config::default());
    eventually("reflector has every object", 20, || {
        store.state().len() == 1203
    })
    .await;
    // An expired continue token is a 410.
    server.compact();
    let expired = api.list(&ListParams::default().limit(500)).await.unwrap();
    server.create(cm("cm-late", "x")).unwrap();
    server.compact();
    let t = expired.metadata.continue_.unwrap();
    let r = api
        .list(&ListParams::default().limit(500).continue_token(&t))
        .await;
    assert_eq!(crate::support::api_code(r), (410, "Expired".to_string()));
}

#[tokio::test]
async fn reflector_follows_adds_updates_deletes_and_relists_after_410() {
    let server = FakeApiServer::start().await;
    for i in 0..3 {
        server.create(cm(&format!("c{i}"), "0")).unwrap();
    }
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let store = reflect(api.clone(), watcher::Config::default());
    eventually("initial list", 10, || contents(&store).len() == 3).await;
    eventually("watch open", 10, || server.open_watches() == 1).await;

    // Changes made through the API reach the store through the watch.
    api.create(
        &PostParams::default(),
        &serde_json::from_value(cm("c3", "0")).unwrap(),
    )
    .await
    .unwrap();
    let mut c0 = api.get("c0").await.unwrap();
    c0.data = Some([("v".to_string(), "1".to_string())].into());
    api.replace("c0", &PostParams::default(), &c0)
        .await
        .unwrap();
    api.delete("c1", &Default::default()).await.unwrap();
    eventually("watch events applied", 10, || {
        contents(&store)
            == BTreeMap::from([
                ("c0".into(), "1".into()),
                ("c2".into(), "0".into()),
                ("c3".into(), "0".into()),
            ])
    })
    .await;
    let lists_before = server
        .requests()
        .iter()
        .filter(|r| r.param("watch").is_none())
        .count();

    // Partition the watch, change things (including a delete) during the gap, compact.
    server.pause_watches();
    eventually("watch closed", 10, || server.open_watches() == 0).await;
    server
        .delete("v1", "ConfigMap", Some("default"), "c2")
        .unwrap();
    server.update(cm("c3", "2")).unwrap();
    server.create(cm("c4", "0")).unwrap();
    server.compact();
    server.resume_watches();
    eventually("store converges after the re-list", 10, || {
        contents(&store)
            == BTreeMap::from([
                ("c0".into(), "1".into()),
                ("c3".into(), "2".into()),
                ("c4".into(), "0".into()),
            ])
    })
    .await;
    assert_eq!(server.expired_watches(), 1);
    let reqs = server.requests();
    let lists_after = reqs.iter().filter(|r| r.param("watch").is_none()).count();
    assert_eq!(lists_after, lists_before + 1, "exactly one re-list");
    // Watches carry the last seen RV and ask for bookmarks.
    let w = reqs.iter().rfind(|r| r.param("watch").is_some()).unwrap();
    assert_eq!(w.param("allowWatchBookmarks").as_deref(), Some("true"));
    assert!(w.param("resourceVersion").is_some());
}

#[tokio::test]
async fn bookmarks_and_timeouts() {
    let server = FakeApiServer::start().await;
    server.set_bookmark_interval(Duration::from_millis(100));
    server.create(cm("a", "0")).unwrap();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let stream = api
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .unwrap();
    let mut stream = Box::pin(stream);
    server.create(cm("b", "0")).unwrap();
    let mut saw_added = false;
    let mut bookmark_rv = None;
    let start = std::time::Instant::now();
    while let Some(ev) = stream.next().await {
        match ev.unwrap() {
            WatchEvent::Added(c) => {
                assert_eq!(c.name_any(), "b");
                saw_added = true;
            }
            WatchEvent::Bookmark(b) => bookmark_rv = Some(b.metadata.resource_version),
            other => panic!("unexpected {other:?}"),
        }
    }
    // The stream ended by itself after timeoutSeconds.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(saw_added);
    assert_eq!(bookmark_rv, Some(server.resource_version().to_string()));

    // A watch from an expired RV is a 200 stream with one ERROR 410 event.
    server.compact();
    let mut stream = Box::pin(api.watch(&WatchParams::default(), &rv).await.unwrap());
    match stream.next().await {
        Some(Ok(WatchEvent::Error(s))) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn streaming_list_sends_initial_events_then_a_marked_bookmark() {
    let server = FakeApiServer::start().await;
    for i in 0..5 {
        server.create(cm(&format!("s{i}"), "0")).unwrap();
    }
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let store = reflect(api, watcher::Config::default().streaming_lists());
    eventually("streamed initial state", 10, || contents(&store).len() == 5).await;
    server.create(cm("s5", "0")).unwrap();
    eventually("later add", 10, || contents(&store).len() == 6).await;
    let first = &server.requests()[0];
    assert_eq!(first.param("sendInitialEvents").as_deref(), Some("true"));
}

#[tokio::test]
async fn label_and_field_selectors_on_list_and_watch() {
    let server = FakeApiServer::start().await;
    server
        .create(pod(
            "a",
            "n1",
            "Running",
            json!({"app": "web", "tier": "fe"}),
        ))
        .unwrap();
    server
        .create(pod("b", "n2", "Running", json!({"app": "web"})))
        .unwrap();
    server
        .create(pod("c", "n1", "Pending", json!({"app": "db"})))
        .unwrap();
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let names = |lp: ListParams| {
        let api = api.clone();
        async move {
            let mut n: Vec<String> = api
                .list(&lp)
                .await
                .unwrap()
                .items
                .iter()
                .map(|p| p.name_any())
                .collect();
            n.sort();
            n.join(",")
        }
    };
    assert_eq!(names(ListParams::default().labels("app=web")).await, "a,b");
    assert_eq!(names(ListParams::default().labels("app!=web")).await, "c");
    assert_eq!(
        names(ListParams::default().labels("app in (db,x)")).await,
        "c"
    );
    assert_eq!(
        names(ListParams::default().labels("app notin (db),!tier")).await,
        "b"
    );
    assert_eq!(names(ListParams::default().labels("tier")).await, "a");
    assert_eq!(
        names(ListParams::default().fields("spec.nodeName=n1")).await,
        "a,c"
    );
    assert_eq!(
        names(ListParams::default().fields("status.phase=Running,spec.nodeName!=n1")).await,
        "b"
    );
    assert_eq!(
        names(ListParams::default().fields("metadata.name=c")).await,
        "c"
    );
    let bad = api.list(&ListParams::default().labels("app in (x")).await;
    assert_eq!(crate::support::api_code(bad).0, 400);
    let bad = api
        .list(&ListParams::default().fields("spec.containers=x"))
        .await;
    assert_eq!(crate::support::api_code(bad).0, 400);

    // A watch with a selector sees objects enter and leave the selection.
    let (reader, writer) = reflector::store();
    let cfg = watcher::Config::default()
        .labels("app=web")
        .fields("spec.nodeName=n1");
    tokio::spawn(
        reflector(writer, watcher(api.clone(), cfg))
            .default_backoff()
            .for_each(|_| async {}),
    );
    let selected = || {
        let mut n: Vec<String> = reader.state().iter().map(|p| p.name_any()).collect();
        n.sort();
        n.join(",")
    };
    eventually("initial selection", 10, || selected() == "a").await;
    server
        .update(pod("c", "n1", "Pending", json!({"app": "web"})))
        .unwrap();
    eventually("c enters", 10, || selected() == "a,c").await;
    server
        .update(pod("a", "n1", "Running", json!({"app": "other"})))
        .unwrap();
    eventually("a leaves", 10, || selected() == "c").await;
    server
        .update(pod("b", "n2", "Running", json!({"app": "web", "x": "y"})))
        .unwrap();
    server
        .create(pod("d", "n1", "Running", json!({"app": "web"})))
        .unwrap();
    eventually("d added, b never", 10, || selected() == "c,d").await;
}
