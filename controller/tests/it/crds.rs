//! The Istio CRDs on a cluster that lacks them, against the fake API server (which, like the
//! real one, serves a custom kind only while its CRD exists): the missing ones are created,
//! an existing one (Istio's) is left exactly as it was, the watchers serve the feed while the
//! kinds are absent and pick them up once their CRDs appear, and the users' YAML applies.

use controller::crds::{ensure, Outcome, MANAGED_BY_LABEL};
use controller::index::{Index, IndexEvent, Kind};
use controller::watch::{run_watchers, watched_kinds};
use fake_apiserver::FakeApiServer;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

const ISTIO_KINDS: [(&str, &str); 6] = [
    ("networking.istio.io", "VirtualService"),
    ("networking.istio.io", "DestinationRule"),
    ("networking.istio.io", "ServiceEntry"),
    ("networking.istio.io", "Sidecar"),
    ("security.istio.io", "AuthorizationPolicy"),
    ("security.istio.io", "PeerAuthentication"),
];

fn scenario(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/scenarios")
        .join(name);
    std::fs::read_to_string(&path).expect("scenario beside the checkout")
}

/// A server serving none of the Istio kinds, except a DestinationRule CRD "installed by
/// Istio's chart" (its own labels and a schema of its own).
async fn cluster_without_most_istio_crds() -> FakeApiServer {
    let server = FakeApiServer::start().await;
    for (g, k) in ISTIO_KINDS {
        server.unregister(g, k);
    }
    server
        .create(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "destinationrules.networking.istio.io",
                "labels": {"app.kubernetes.io/managed-by": "Helm", "app": "istio-pilot"}},
            "spec": {"group": "networking.istio.io", "scope": "Namespaced",
                "names": {"kind": "DestinationRule", "plural": "destinationrules",
                    "singular": "destinationrule", "listKind": "DestinationRuleList", "shortNames": ["dr"]},
                "versions": [
                    {"name": "v1alpha3", "served": true, "storage": true, "subresources": {"status": {}},
                     "schema": {"openAPIV3Schema": {"type": "object", "description": "istio's"}}},
                    {"name": "v1beta1", "served": true, "storage": false, "subresources": {"status": {}},
                     "schema": {"openAPIV3Schema": {"type": "object", "description": "istio's"}}},
                    {"name": "v1", "served": true, "storage": false, "subresources": {"status": {}},
                     "schema": {"openAPIV3Schema": {"type": "object", "description": "istio's"}}}]},
        }))
        .expect("istio's CRD");
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_istio_crds_are_created_and_existing_ones_left_alone() {
    let server = cluster_without_most_istio_crds().await;
    let canary = scenario("demoapp-canary.yaml");
    let before = server.apply_yaml(&canary);
    assert!(before.is_err(), "VirtualService is not served yet");
    let istios = server
        .get(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            None,
            "destinationrules.networking.istio.io",
        )
        .expect("istio's CRD");

    let outcomes = ensure(&server.client()).await.expect("ensure");
    let created: BTreeSet<String> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Created(n) => Some(n.clone()),
            Outcome::Present(_) => None,
        })
        .collect();
    assert_eq!(created.len(), 5, "{outcomes:?}");
    assert!(outcomes.contains(&Outcome::Present(
        "destinationrules.networking.istio.io".into()
    )));
    // Istio's definition is untouched (no write at all: same resourceVersion).
    let after = server
        .get(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            None,
            "destinationrules.networking.istio.io",
        )
        .expect("istio's CRD");
    assert_eq!(after, istios);
    let vs_crd = server
        .get(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            None,
            "virtualservices.networking.istio.io",
        )
        .expect("our CRD");
    assert_eq!(
        vs_crd["metadata"]["labels"][MANAGED_BY_LABEL],
        "ambient-controller"
    );

    // The users' files apply unchanged (v1alpha3 VirtualService, v1beta1 DestinationRule,
    // security.istio.io/v1 policies, ServiceEntry, Sidecar).
    for f in [
        "demoapp-canary.yaml",
        "policies.yaml",
        "serviceentry.yaml",
        "sidecar-egress.yaml",
    ] {
        server
            .apply_yaml(&scenario(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    // A second run (another replica gaining the lease) creates nothing.
    let again = ensure(&server.client()).await.expect("ensure");
    assert!(again.iter().all(|o| matches!(o, Outcome::Present(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_is_served_without_istio_crds_and_picks_them_up_later() {
    let server = cluster_without_most_istio_crds().await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let watchers = tokio::spawn(run_watchers(server.client(), tx));
    let mut index = Index::default();
    let mut synced = BTreeSet::new();
    let mut next = async |index: &mut Index, synced: &mut BTreeSet<Kind>| {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("an event within 30 s")
            .expect("watchers running");
        if let IndexEvent::Synced(k) = &ev {
            synced.insert(*k);
        }
        index.handle(ev);
    };
    // Every kind counts as listed, the absent ones included: the feed would be served.
    while synced.len() < watched_kinds().len() {
        next(&mut index, &mut synced).await;
    }
    ensure(&server.client()).await.expect("ensure");
    server
        .apply_yaml(&scenario("demoapp-canary.yaml"))
        .expect("canary applies");
    server
        .apply_yaml(&scenario("policies.yaml"))
        .expect("policies apply");
    // Watch retries back off (0.8 s, 1.6 s…): within 30 s the VirtualService is in the index.
    while !index
        .configs()
        .values()
        .any(|v| v["kind"] == "VirtualService")
        || index.authorizations().is_empty()
    {
        next(&mut index, &mut synced).await;
    }
    watchers.abort();
}
