//! ClusterIP allocation for Services written through the API (kept across updates that leave
//! it out) and switching ownerReference garbage collection off.

use crate::support::eventually;
use fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

fn svc(name: &str, spec: serde_json::Value) -> Service {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("service")
}

#[tokio::test]
async fn services_get_a_cluster_ip_that_updates_keep() {
    let server = FakeApiServer::start().await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    let pp = PostParams::default();
    let a = api
        .create(&pp, &svc("a", json!({"ports": [{"port": 80}]})))
        .await
        .expect("create a");
    let b = api
        .create(&pp, &svc("b", json!({"ports": [{"port": 80}]})))
        .await
        .expect("create b");
    let ip = |s: &Service| s.spec.as_ref().and_then(|s| s.cluster_ip.clone());
    let ips = |s: &Service| s.spec.as_ref().and_then(|s| s.cluster_ips.clone());
    let ip_a = ip(&a).expect("a has a cluster IP");
    assert!(ip_a.starts_with("10.96."), "{ip_a}");
    assert_eq!(ips(&a), Some(vec![ip_a.clone()]));
    assert_ne!(ip(&b), Some(ip_a.clone()), "distinct addresses");
    // An address taken by hand is never handed out again.
    let next = |ip: &str| {
        let v: std::net::Ipv4Addr = ip.parse().unwrap();
        std::net::Ipv4Addr::from(u32::from(v) + 1).to_string()
    };
    let b_ip = ip(&b).unwrap();
    let manual = api
        .create(
            &pp,
            &svc(
                "m",
                json!({"clusterIP": next(&b_ip), "ports": [{"port": 80}]}),
            ),
        )
        .await
        .expect("manual");
    let auto = api
        .create(&pp, &svc("n", json!({"ports": [{"port": 80}]})))
        .await
        .expect("auto");
    assert_ne!(
        ip(&auto),
        ip(&manual),
        "allocated an address already in use"
    );
    let headless = api
        .create(
            &pp,
            &svc("h", json!({"clusterIP": "None", "ports": [{"port": 80}]})),
        )
        .await
        .expect("headless");
    assert_eq!(ip(&headless).as_deref(), Some("None"));
    let external = api
        .create(
            &pp,
            &svc(
                "x",
                json!({"type": "ExternalName", "externalName": "example.com"}),
            ),
        )
        .await
        .expect("external name");
    assert_eq!(ip(&external), None);
    // Server-side apply (create, then update) without the field keeps the allocation.
    let body = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"},
                      "spec": {"ports": [{"port": 80}]}});
    let c = api
        .patch("c", &PatchParams::apply("t"), &Patch::Apply(&body))
        .await
        .expect("apply create");
    let ip_c = ip(&c).expect("applied service has a cluster IP");
    let mut body2 = body.clone();
    body2["spec"]["ports"] = json!([{"port": 81}]);
    let c2 = api
        .patch("c", &PatchParams::apply("t"), &Patch::Apply(&body2))
        .await
        .expect("apply update");
    assert_eq!(ip(&c2), Some(ip_c.clone()));
    // A replace without it keeps it too.
    let mut replaced = c2.clone();
    if let Some(spec) = replaced.spec.as_mut() {
        spec.cluster_ip = None;
        spec.cluster_ips = None;
    }
    let c3 = api.replace("c", &pp, &replaced).await.expect("replace");
    assert_eq!(ip(&c3), Some(ip_c));
    // Test-side creates are stored as given.
    let raw = server
        .create(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "raw"},
                       "spec": {"ports": [{"port": 80}]}}),
        )
        .expect("raw create");
    assert!(raw["spec"].get("clusterIP").is_none());
}

#[tokio::test]
async fn garbage_collection_can_be_switched_off() {
    let server = FakeApiServer::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let pp = PostParams::default();
    let cm = |name: &str, owner: Option<(&str, String)>| -> ConfigMap {
        let mut v = json!({"metadata": {"name": name}});
        if let Some((n, uid)) = owner {
            v["metadata"]["ownerReferences"] =
                json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": n, "uid": uid}]);
        }
        serde_json::from_value(v).expect("configmap")
    };
    let owner = cms.create(&pp, &cm("owner", None)).await.expect("owner");
    let uid = owner.uid().expect("uid");
    cms.create(&pp, &cm("child", Some(("owner", uid.clone()))))
        .await
        .expect("child");
    server.set_garbage_collection(false);
    cms.delete("owner", &DeleteParams::default())
        .await
        .expect("delete owner");
    assert!(
        server
            .get("v1", "ConfigMap", Some("default"), "child")
            .is_some(),
        "no GC: the dependent stays"
    );
    // On again: collection works for later deletions.
    server.set_garbage_collection(true);
    let owner2 = cms.create(&pp, &cm("owner2", None)).await.expect("owner2");
    cms.create(
        &pp,
        &cm("child2", Some(("owner2", owner2.uid().expect("uid")))),
    )
    .await
    .expect("child2");
    cms.delete("owner2", &DeleteParams::default())
        .await
        .expect("delete owner2");
    eventually("child2 collected", 5, || {
        server
            .get("v1", "ConfigMap", Some("default"), "child2")
            .is_none()
    })
    .await;
}
