//! Writes through kube::Client: server-side apply, status subresource, preconditions,
//! garbage collection, finalizers, TokenReview, Leases, and loading the shared fixture.

use crate::support::api_code;
use fake_apiserver::{FakeApiServer, TokenInfo};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::core::ApiResource;
use kube::ResourceExt;
use serde_json::json;

fn deployment(labels: serde_json::Value, replicas: i32) -> serde_json::Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default", "labels": labels},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "web:1"}]}}}})
}

fn managers(d: &Deployment) -> Vec<(String, String)> {
    d.managed_fields()
        .iter()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
            )
        })
        .collect()
}

fn owns(d: &Deployment, manager: &str, field: &str) -> bool {
    d.managed_fields().iter().any(|m| {
        m.manager.as_deref() == Some(manager)
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer(field).is_some())
    })
}

#[tokio::test]
async fn server_side_apply_create_update_remove_and_conflict() {
    let server = FakeApiServer::start().await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");
    let a = PatchParams::apply("alpha");
    let d = api
        .patch(
            "web",
            &a,
            &Patch::Apply(deployment(json!({"app": "web", "extra": "1"}), 2)),
        )
        .await
        .unwrap();
    assert_eq!(d.metadata.generation, Some(1));
    assert!(d.metadata.uid.is_some() && d.metadata.creation_timestamp.is_some());
    assert_eq!(
        managers(&d),
        vec![("alpha".to_string(), "Apply".to_string())]
    );
    assert!(owns(&d, "alpha", "/f:spec/f:replicas"));
    assert!(owns(&d, "alpha", "/f:metadata/f:labels/f:extra"));

    // Re-applying without a field removes it; a spec change bumps generation.
    let d2 = api
        .patch(
            "web",
            &a,
            &Patch::Apply(deployment(json!({"app": "web"}), 3)),
        )
        .await
        .unwrap();
    assert_eq!(d2.labels().get("extra"), None);
    assert_eq!(d2.spec.as_ref().unwrap().replicas, Some(3));
    assert_eq!(d2.metadata.generation, Some(2));
    // The same configuration again changes nothing (no new resourceVersion).
    let d3 = api
        .patch(
            "web",
            &a,
            &Patch::Apply(deployment(json!({"app": "web"}), 3)),
        )
        .await
        .unwrap();
    assert_eq!(d3.metadata.resource_version, d2.metadata.resource_version);

    // Another manager changing an owned field conflicts unless it forces.
    let b_cfg = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"}, "spec": {"replicas": 5}});
    let r = api
        .patch(
            "web",
            &PatchParams::apply("beta"),
            &Patch::Apply(b_cfg.clone()),
        )
        .await;
    assert_eq!(api_code(r), (409, "Conflict".to_string()));
    // Agreeing on the value is shared ownership, not a conflict.
    let same = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"}, "spec": {"replicas": 3}});
    api.patch("web", &PatchParams::apply("gamma"), &Patch::Apply(same))
        .await
        .unwrap();
    let forced = api
        .patch(
            "web",
            &PatchParams::apply("beta").force(),
            &Patch::Apply(b_cfg),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.as_ref().unwrap().replicas, Some(5));
    assert!(owns(&forced, "beta", "/f:spec/f:replicas"));
    assert!(!owns(&forced, "alpha", "/f:spec/f:replicas"));
    assert!(!owns(&forced, "gamma", "/f:spec/f:replicas"));
    // alpha still owns the rest and can drop replicas from its config without removing it.
    let mut alpha_cfg = deployment(json!({"app": "web"}), 0);
    alpha_cfg["spec"]
        .as_object_mut()
        .unwrap()
        .remove("replicas");
    let d4 = api
        .patch("web", &a, &Patch::Apply(alpha_cfg))
        .await
        .unwrap();
    assert_eq!(d4.spec.as_ref().unwrap().replicas, Some(5));

    // A merge patch by another manager takes ownership (operation Update).
    let mp = PatchParams {
        field_manager: Some("editor".into()),
        ..Default::default()
    };
    let d5 = api
        .patch(
            "web",
            &mp,
            &Patch::Merge(json!({"metadata": {"labels": {"app": "web2"}}})),
        )
        .await
        .unwrap();
    assert!(managers(&d5).contains(&("editor".to_string(), "Update".to_string())));
    let r = api
        .patch(
            "web",
            &a,
            &Patch::Apply(deployment(json!({"app": "web"}), 5)),
        )
        .await;
    assert_eq!(api_code(r).0, 409);
    // apply needs a field manager and the right kind.
    let bad = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web"}});
    let r = api
        .patch("web", &PatchParams::apply("alpha"), &Patch::Apply(bad))
        .await;
    assert_eq!(api_code(r).0, 400);
}

#[tokio::test]
async fn status_subresource_and_preconditions() {
    let server = FakeApiServer::start().await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");
    let mut d: Deployment = serde_json::from_value(deployment(json!({"app": "web"}), 1)).unwrap();
    d.status = Some(serde_json::from_value(json!({"replicas": 9})).unwrap());
    let created = api.create(&PostParams::default(), &d).await.unwrap();
    assert!(created.status.is_none(), "status is not writable on create");
    assert_eq!(
        api_code(api.create(&PostParams::default(), &d).await),
        (409, "AlreadyExists".into())
    );

    // replace_status changes only status: RV moves, generation does not.
    let mut s = created.clone();
    s.status = Some(serde_json::from_value(json!({"replicas": 1, "readyReplicas": 1})).unwrap());
    s.spec.as_mut().unwrap().replicas = Some(7);
    let after = api
        .replace_status("web", &PostParams::default(), &s)
        .await
        .unwrap();
    assert_eq!(after.status.as_ref().unwrap().ready_replicas, Some(1));
    assert_eq!(after.spec.as_ref().unwrap().replicas, Some(1));
    assert_eq!(after.metadata.generation, Some(1));
    assert_ne!(
        after.metadata.resource_version,
        created.metadata.resource_version
    );

    // A main-resource write ignores status and bumps generation for spec changes.
    let p = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}, "status": {"replicas": 100}})),
        )
        .await
        .unwrap();
    assert_eq!(p.metadata.generation, Some(2));
    assert_eq!(p.status.as_ref().unwrap().replicas, Some(1));
    let ps = api
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 4}})),
        )
        .await
        .unwrap();
    assert_eq!(
        (ps.status.as_ref().unwrap().replicas, ps.metadata.generation),
        (Some(4), Some(2))
    );
    let got = api.get_status("web").await.unwrap();
    assert_eq!(got.status.unwrap().replicas, Some(4));

    // A stale resourceVersion on replace is a conflict.
    let mut stale = created.clone();
    stale.spec.as_mut().unwrap().replicas = Some(2);
    assert_eq!(
        api_code(api.replace("web", &PostParams::default(), &stale).await),
        (409, "Conflict".into())
    );
    // JSON patch works too.
    let jp: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/spec/replicas", "value": 6}]))
            .unwrap();
    let j = api
        .patch("web", &PatchParams::default(), &Patch::<()>::Json(jp))
        .await
        .unwrap();
    assert_eq!(j.spec.unwrap().replicas, Some(6));
    assert_eq!(api_code(api.get("nope").await), (404, "NotFound".into()));

    // A test marks a pod ready through the test-side API; clients see it.
    server.apply_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i}]}\nstatus: {phase: Pending}\n").unwrap();
    let mut raw = server.get("v1", "Pod", Some("default"), "p").unwrap();
    raw["status"] =
        json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
    server.update(raw).unwrap();
    let pod = Api::<Pod>::namespaced(server.client(), "default")
        .get("p")
        .await
        .unwrap();
    let conds = pod.status.unwrap().conditions.unwrap();
    assert_eq!(
        (conds[0].type_.as_str(), conds[0].status.as_str()),
        ("Ready", "True")
    );
}

#[tokio::test]
async fn delete_collects_garbage_and_honours_finalizers() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let d = deps
        .patch(
            "web",
            &PatchParams::apply("t"),
            &Patch::Apply(deployment(json!({}), 1)),
        )
        .await
        .unwrap();
    let other = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "other"}})).unwrap(),
        )
        .await
        .unwrap();
    let owner = |name: &str, uid: &str, kind: &str, api: &str| json!({"apiVersion": api, "kind": kind, "name": name, "uid": uid});
    let d_uid = d.uid().unwrap();
    let child = |name: &str, owners: serde_json::Value| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name, "ownerReferences": owners}}))
            .unwrap()
    };
    let c1 = cms
        .create(
            &PostParams::default(),
            &child(
                "child",
                json!([owner("web", &d_uid, "Deployment", "apps/v1")]),
            ),
        )
        .await
        .unwrap();
    cms.create(
        &PostParams::default(),
        &child(
            "grandchild",
            json!([owner("child", &c1.uid().unwrap(), "ConfigMap", "v1")]),
        ),
    )
    .await
    .unwrap();
    cms.create(
        &PostParams::default(),
        &child(
            "shared",
            json!([
                owner("web", &d_uid, "Deployment", "apps/v1"),
                owner("other", &other.uid().unwrap(), "ConfigMap", "v1")
            ]),
        ),
    )
    .await
    .unwrap();

    // Preconditions are checked.
    let wrong = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("x".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    assert_eq!(api_code(deps.delete("web", &wrong).await).0, 409);
    let status = deps.delete("web", &DeleteParams::default()).await.unwrap();
    assert!(
        status.is_right(),
        "immediate deletion answers with a Status"
    );
    let mut left: Vec<String> = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["other", "shared"],
        "dependents (transitively) collected; co-owned kept"
    );

    // Orphan propagation keeps dependents and drops the owner reference.
    cms.create(
        &PostParams::default(),
        &child(
            "orphan",
            json!([owner("other", &other.uid().unwrap(), "ConfigMap", "v1")]),
        ),
    )
    .await
    .unwrap();
    cms.delete("other", &DeleteParams::orphan()).await.unwrap();
    let orphan = cms.get("orphan").await.unwrap();
    assert!(orphan.owner_references().is_empty());
    assert!(cms.get("shared").await.is_ok());

    // Finalizers: DELETE only marks; removing the last finalizer removes the object.
    let f: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "fin", "finalizers": ["example.com/x"]}}),
    )
    .unwrap();
    cms.create(&PostParams::default(), &f).await.unwrap();
    let marked = cms
        .delete("fin", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("object returned");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert!(cms.get("fin").await.is_ok());
    cms.patch(
        "fin",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(api_code(cms.get("fin").await).0, 404);
    assert_eq!(
        api_code(cms.delete("fin", &DeleteParams::default()).await).0,
        404
    );
}

#[tokio::test]
async fn token_review_authenticates_registered_tokens() {
    let server = FakeApiServer::start().await;
    let extra = [
        (
            "authentication.kubernetes.io/pod-name".to_string(),
            vec!["web-1".to_string()],
        ),
        (
            "authentication.kubernetes.io/pod-uid".to_string(),
            vec!["uid-1".to_string()],
        ),
    ];
    server.add_token(
        "good",
        TokenInfo {
            username: "system:serviceaccount:default:web".into(),
            uid: "sa-uid".into(),
            groups: vec!["system:serviceaccounts".into()],
            audiences: vec!["istio-ca".into()],
            extra: extra.into_iter().collect(),
            expired: false,
        },
    );
    server.add_token(
        "old",
        TokenInfo {
            username: "u".into(),
            audiences: vec!["istio-ca".into()],
            expired: true,
            ..Default::default()
        },
    );
    server.add_token(
        "api",
        TokenInfo {
            username: "apiuser".into(),
            ..Default::default()
        },
    );
    let api: Api<TokenReview> = Api::all(server.client());
    let review = |token: &str, aud: &[&str]| {
        let api = api.clone();
        let tr = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: (!aud.is_empty()).then(|| aud.iter().map(|a| a.to_string()).collect()),
            },
            ..Default::default()
        };
        async move {
            api.create(&PostParams::default(), &tr)
                .await
                .unwrap()
                .status
                .unwrap()
        }
    };
    let ok = review("good", &["istio-ca"]).await;
    assert_eq!(ok.authenticated, Some(true));
    let user = ok.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:default:web")
    );
    assert_eq!(
        user.extra.unwrap()["authentication.kubernetes.io/pod-name"],
        vec!["web-1".to_string()]
    );
    assert_eq!(ok.audiences, Some(vec!["istio-ca".to_string()]));
    for (token, aud) in [
        ("good", vec!["other"]),
        ("good", vec![]),
        ("old", vec!["istio-ca"]),
        ("nope", vec!["istio-ca"]),
    ] {
        let s = review(token, &aud).await;
        assert_eq!(s.authenticated, Some(false), "{token} {aud:?}");
        assert!(s.error.is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(review("api", &[]).await.authenticated, Some(true));
}

#[tokio::test]
async fn lease_acquire_and_renew_with_resource_version_preconditions() {
    let server = FakeApiServer::start().await;
    let api: Api<Lease> = Api::namespaced(server.client(), "istio-system");
    let lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some("leader".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    };
    let held = api.create(&PostParams::default(), &lease).await.unwrap();
    // Both candidates read the same version; the first write wins, the second conflicts.
    let mut by_a = held.clone();
    by_a.spec.as_mut().unwrap().lease_transitions = Some(0);
    let mut by_b = held.clone();
    by_b.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let renewed = api
        .replace("leader", &PostParams::default(), &by_a)
        .await
        .unwrap();
    assert_eq!(
        api_code(api.replace("leader", &PostParams::default(), &by_b).await),
        (409, "Conflict".into())
    );
    // b retries from the latest version and takes over.
    let mut retry = api.get("leader").await.unwrap();
    assert_eq!(
        retry.metadata.resource_version,
        renewed.metadata.resource_version
    );
    retry.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let taken = api
        .replace("leader", &PostParams::default(), &retry)
        .await
        .unwrap();
    assert_eq!(taken.spec.unwrap().holder_identity.as_deref(), Some("b"));
    // SSA-based locking: holder claims conflict for a different manager.
    let claim = |who: &str| json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "ssa"}, "spec": {"holderIdentity": who}});
    api.patch("ssa", &PatchParams::apply("a"), &Patch::Apply(claim("a")))
        .await
        .unwrap();
    let r = api
        .patch("ssa", &PatchParams::apply("b"), &Patch::Apply(claim("b")))
        .await;
    assert_eq!(api_code(r).0, 409);
}

#[tokio::test]
async fn demoapp_fixture_loads_and_deserializes_as_typed_objects() {
    let server = FakeApiServer::start().await;
    let yaml = std::fs::read_to_string("/work/shared/k8s-fixtures/demoapp-cluster.yaml").unwrap();
    let loaded = server.apply_yaml(&yaml).unwrap();
    assert_eq!(loaded.len(), 28);
    let client = server.client();
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(pods.items.len(), 10);
    let terminating = pods
        .items
        .iter()
        .find(|p| p.metadata.deletion_timestamp.is_some())
        .expect("terminating pod kept");
    assert!(terminating.name_any().starts_with("demoappv11"));
    let ips: Vec<_> = pods
        .items
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    assert!(ips.contains(&"10.244.1.10".to_string()));
    let default_pods = Api::<Pod>::namespaced(client.clone(), "other")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(default_pods.items.len(), 1);
    assert_eq!(
        Api::<Service>::all(client.clone())
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        4
    );
    assert_eq!(
        Api::<EndpointSlice>::all(client.clone())
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        5
    );
    // Gateways are visible under every served version of the kind.
    for v in ["v1", "v1beta1", "v1alpha2"] {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gateway.networking.k8s.io", v, "Gateway"),
            "gateways",
        );
        let gws = Api::<DynamicObject>::all_with(client.clone(), &ar)
            .list(&ListParams::default())
            .await
            .unwrap();
        assert_eq!(gws.items.len(), 2, "{v}");
        assert_eq!(
            gws.items[0].types.as_ref().unwrap().api_version,
            format!("gateway.networking.k8s.io/{v}")
        );
    }
    // Loading again replaces in place (same uids).
    let again = server.apply_yaml(&yaml).unwrap();
    assert_eq!(again[0]["metadata"]["uid"], loaded[0]["metadata"]["uid"]);
}

#[tokio::test]
async fn a_custom_kind_is_served_while_its_crd_exists() {
    let server = FakeApiServer::start().await;
    server.unregister("networking.istio.io", "VirtualService");
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1beta1", "VirtualService"),
        "virtualservices",
    );
    let vs: Api<DynamicObject> = Api::namespaced_with(server.client(), "default", &ar);
    assert_eq!(api_code(vs.list(&ListParams::default()).await).0, 404);

    let crds: Api<DynamicObject> = Api::all_with(
        server.client(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
            "customresourcedefinitions",
        ),
    );
    let crd: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "virtualservices.networking.istio.io"},
        "spec": {"group": "networking.istio.io", "scope": "Namespaced",
            "names": {"kind": "VirtualService", "plural": "virtualservices"},
            "versions": [
                {"name": "v1alpha3", "served": true, "storage": true, "subresources": {"status": {}}},
                {"name": "v1beta1", "served": true, "storage": false},
                {"name": "v1", "served": false, "storage": false}]},
    }))
    .expect("crd");
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("create CRD");
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
        "metadata": {"name": "r"}, "spec": {"hosts": ["r"]}}))
    .expect("vs");
    vs.create(&PostParams::default(), &obj)
        .await
        .expect("served now");
    // Reported in the storage version; a version that is not served is not routed.
    let got = server
        .get(
            "networking.istio.io/v1alpha3",
            "VirtualService",
            Some("default"),
            "r",
        )
        .expect("stored");
    assert_eq!(got["apiVersion"], "networking.istio.io/v1alpha3");
    let v1 = Api::<DynamicObject>::namespaced_with(
        server.client(),
        "default",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("networking.istio.io", "v1", "VirtualService"),
            "virtualservices",
        ),
    );
    assert_eq!(api_code(v1.list(&ListParams::default()).await).0, 404);
    crds.delete(
        "virtualservices.networking.istio.io",
        &DeleteParams::default(),
    )
    .await
    .expect("delete CRD");
    assert_eq!(api_code(vs.list(&ListParams::default()).await).0, 404);
}
