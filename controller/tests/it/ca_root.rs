//! The root of trust in Kubernetes: the CA Secret (generated once, shared by replicas, or
//! plugged in with an intermediate) and the root ConfigMaps published by the lease holder.

use crate::ca_support::*;
use common::identity::ca::{cert_ders, first_cert_der};
use common::identity::{csr, Identity};
use controller::ca::root;
use controller::leader;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn ca_root_secret_is_generated_once_and_reused() {
    let api = cluster().await;
    let c = api.client();
    // Two replicas starting together: one creates, the other reads the winner's.
    let (a, b) = tokio::join!(
        root::load_or_create(c.clone(), NS, "ambient-ca", TD),
        root::load_or_create(c.clone(), NS, "ambient-ca", TD),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.root_der(), b.root_der());
    let third = root::load_or_create(c, NS, "ambient-ca", TD).await.unwrap();
    assert_eq!(third.root_der(), a.root_der());
    let secrets = api.list("v1", "Secret");
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0]["metadata"]["name"], "ambient-ca");
    // A key issued by one replica verifies under the other's root.
    let id = Identity::new(TD, "ns", "sa");
    let new = csr::build(&id).unwrap();
    let v = csr::verify(&new.pem).unwrap();
    let chain = a
        .sign_public_key(&v.public_key, &id, Duration::from_secs(60))
        .unwrap();
    let roots = common::tls::TrustRoots::new(vec![b.root_der().clone()]).unwrap();
    common::tls::verify_chain(&first_cert_der(&chain.cert_chain[0]).unwrap(), &[], &roots).unwrap();
}

#[tokio::test]
async fn ca_plugged_in_intermediate_returns_leaf_intermediate_root() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let api = cluster().await;
    let root_key = KeyPair::generate().unwrap();
    let mut rp = CertificateParams::default();
    rp.distinguished_name.push(DnType::CommonName, "corp root");
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ext_root = rp.self_signed(&root_key).unwrap();
    let int_key = KeyPair::generate().unwrap();
    let mut ip = CertificateParams::default();
    ip.distinguished_name
        .push(DnType::CommonName, "mesh intermediate");
    ip.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let int = ip.signed_by(&int_key, &ext_root, &root_key).unwrap();
    let b64 = |s: String| {
        // Secret data is base64 on the wire; let k8s-openapi encode it.
        serde_json::to_value(k8s_openapi::ByteString(s.into_bytes())).unwrap()
    };
    api.create(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"namespace": NS, "name": "ambient-ca"},
        "data": {
            "ca-cert.pem": b64(int.pem()),
            "ca-key.pem": b64(int_key.serialize_pem()),
            "root-cert.pem": b64(ext_root.pem()),
            "cert-chain.pem": b64(format!("{}{}", int.pem(), ext_root.pem())),
        }
    }))
    .unwrap();
    let server = CaServer::start(&api, test_config(), any_port()).await;
    let own = Identity::new(TD, "app", "waypoint");
    let new = csr::build(&own).unwrap();
    let resp = server
        .raw(Some(WAYPOINT), &new.pem, None)
        .await
        .expect("issued");
    assert_eq!(resp.cert_chain.len(), 3);
    assert_eq!(cert_ders(&resp.cert_chain[1]), vec![int.der().clone()]);
    assert_eq!(cert_ders(&resp.cert_chain[2]), vec![ext_root.der().clone()]);
    let roots = common::tls::TrustRoots::new(vec![ext_root.der().clone()]).unwrap();
    let leaf = first_cert_der(&resp.cert_chain[0]).unwrap();
    common::tls::verify_chain(&leaf, &[int.der().clone()], &roots).unwrap();
}

fn root_cm(api: &fake_apiserver::FakeApiServer, ns: &str) -> Option<String> {
    api.get("v1", "ConfigMap", Some(ns), root::ROOT_CONFIGMAP)
        .and_then(|c| c["data"]["root-cert.pem"].as_str().map(str::to_string))
}

#[tokio::test]
async fn ca_root_configmap_is_published_to_ambient_namespaces_by_the_leader_only() {
    let api = cluster().await;
    for (name, ambient) in [("app", true), ("other", false)] {
        let mut labels = serde_json::Map::new();
        if ambient {
            labels.insert(root::AMBIENT_LABEL.into(), json!(root::AMBIENT_VALUE));
        }
        api.create(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}}))
            .unwrap();
    }
    let ca = root::load_or_create(api.client(), NS, "ambient-ca", TD)
        .await
        .unwrap();
    let pem = ca.root_pem().to_string();
    let (lead_tx, lead_rx) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(root::publish_root(
        api.client(),
        NS.into(),
        pem.clone(),
        lead_rx,
    ));
    // Not the leader: nothing is written.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(root_cm(&api, "app"), None);
    assert_eq!(root_cm(&api, NS), None);
    // Leader: the ambient namespace and our own get it, the other does not.
    lead_tx.send_replace(true);
    assert!(
        eventually(Duration::from_secs(5), || root_cm(&api, "app").as_deref()
            == Some(pem.as_str()))
        .await
    );
    assert!(
        eventually(Duration::from_secs(5), || root_cm(&api, NS).as_deref()
            == Some(pem.as_str()))
        .await
    );
    assert_eq!(root_cm(&api, "other"), None);
    // A namespace joining the mesh gets it; a tampered copy is restored.
    api.update(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "other", "labels": {root::AMBIENT_LABEL: root::AMBIENT_VALUE}}}))
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || root_cm(&api, "other").is_some()).await);
    let mut cm = api
        .get("v1", "ConfigMap", Some("app"), root::ROOT_CONFIGMAP)
        .unwrap();
    cm["data"]["root-cert.pem"] = json!("tampered");
    api.update(cm).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || root_cm(&api, "app").as_deref()
            == Some(pem.as_str()))
        .await
    );
    // Losing the lease: a later change is no longer repaired by this replica.
    lead_tx.send_replace(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.delete("v1", "ConfigMap", Some("app"), root::ROOT_CONFIGMAP)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(root_cm(&api, "app"), None);
    publisher.abort();
}

#[tokio::test]
async fn ca_root_configmap_follows_waypoint_gateways_into_non_ambient_namespaces() {
    let api = cluster().await;
    for name in ["wp", "team", "foreign"] {
        api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
            .unwrap();
    }
    for (class, controller) in [
        ("team-waypoints", "istio.io/mesh-controller"),
        ("someone-elses", "example.com/gateway"),
    ] {
        api.create(
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": class}, "spec": {"controllerName": controller}}),
        )
        .unwrap();
    }
    let gateway = |ns: &str, class: &str| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": ns},
            "spec": {"gatewayClassName": class,
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
    };
    let ca = root::load_or_create(api.client(), NS, "ambient-ca", TD)
        .await
        .unwrap();
    let pem = ca.root_pem().to_string();
    let (_lead_tx, lead_rx) = tokio::sync::watch::channel(true);
    let publisher = tokio::spawn(root::publish_root(
        api.client(),
        NS.into(),
        pem.clone(),
        lead_rx,
    ));
    assert!(
        eventually(Duration::from_secs(5), || root_cm(&api, NS).is_some()).await,
        "own namespace first"
    );
    // A waypoint's namespace needs the root (its pods mount it) though it is not ambient.
    api.create(gateway("foreign", "someone-elses")).unwrap();
    api.create(gateway("wp", "istio-waypoint")).unwrap();
    api.create(gateway("team", "team-waypoints")).unwrap();
    for ns in ["wp", "team"] {
        assert!(
            eventually(Duration::from_secs(5), || root_cm(&api, ns).as_deref()
                == Some(pem.as_str()))
            .await,
            "{ns}"
        );
    }
    // Another controller's Gateway is not a waypoint.
    assert_eq!(root_cm(&api, "foreign"), None);
    publisher.abort();
}

#[tokio::test]
async fn ca_exactly_one_replica_holds_the_lease_and_another_takes_over() {
    let api = cluster().await;
    let a = leader::elect(api.client(), NS, leader::LEASE_NAME, "replica-a", 2);
    let b = leader::elect(api.client(), NS, leader::LEASE_NAME, "replica-b", 2);
    let (mut ra, mut rb) = (a.is_leader.clone(), b.is_leader.clone());
    assert!(
        eventually(Duration::from_secs(6), || *ra.borrow_and_update()
            || *rb.borrow_and_update())
        .await
    );
    // Hold for more than a lease period: never both.
    for _ in 0..30 {
        assert!(!(*ra.borrow() && *rb.borrow()), "two leaders");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a_leads = *ra.borrow();
    drop((ra, rb));
    let (stopped, survivor) = if a_leads { (a, b) } else { (b, a) };
    stopped.stop().await;
    let mut survivor = survivor.is_leader.clone();
    assert!(
        eventually(Duration::from_secs(8), || *survivor.borrow_and_update()).await,
        "the other replica takes over"
    );
    let lease = api
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            Some(NS),
            leader::LEASE_NAME,
        )
        .expect("lease object");
    let holder = lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(holder, if a_leads { "replica-b" } else { "replica-a" });
}

/// The Secret form of `ca` (what an operator would write to rotate to it).
fn secret_of(ca: &common::identity::ca::MeshCa) -> serde_json::Value {
    let (cert, key) = ca.signing_pems();
    let b64 = |s: String| serde_json::to_value(k8s_openapi::ByteString(s.into_bytes())).unwrap();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"namespace": NS, "name": "ambient-ca"},
        "type": "istio.io/ca-root",
        "data": {
            "ca-cert.pem": b64(cert),
            "ca-key.pem": b64(key),
            "root-cert.pem": b64(ca.root_pem().to_string()),
        }
    })
}

#[tokio::test]
async fn ca_follows_a_replaced_secret_without_restart() {
    use common::identity::ca::MeshCa;
    use common::tls::{verify_chain, TrustRoots};
    let api = cluster().await;
    api.create(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "app", "labels": {root::AMBIENT_LABEL: root::AMBIENT_VALUE}}}))
        .unwrap();
    let old = std::sync::Arc::new(
        root::load_or_create(api.client(), NS, "ambient-ca", TD)
            .await
            .unwrap(),
    );
    let (following, follow_task) = controller::ca::follow::follow_secret(
        api.client(),
        NS,
        "ambient-ca",
        old.clone(),
        Duration::from_secs(3600),
    );
    let follow_task = tokio::spawn(follow_task);
    let (_lead, leader) = tokio::sync::watch::channel(true);
    let publisher = tokio::spawn(root::publish_roots(
        api.client(),
        NS.into(),
        following.roots.clone(),
        leader,
    ));
    let server =
        CaServer::start_following(&api, test_config(), any_port(), following.ca.clone()).await;
    let old_pem = old.root_pem().to_string();
    assert!(
        eventually(Duration::from_secs(5), || root_cm(&api, "app").as_deref()
            == Some(old_pem.as_str()))
        .await,
        "the current root is published"
    );
    let own = Identity::new(TD, "app", "waypoint");
    let before = server
        .raw(Some(WAYPOINT), &csr::build(&own).unwrap().pem, None)
        .await
        .expect("issued before the rotation");
    // Unchanged Secret events (the first list) change nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(std::sync::Arc::ptr_eq(&following.ca.borrow(), &old));

    // The operator replaces the CA.
    let new = MeshCa::generate(TD).unwrap();
    api.update(secret_of(&new)).unwrap();
    let new_root = new.root_der().clone();
    let old_root = old.root_der().clone();
    assert!(
        eventually(Duration::from_secs(5), || root_cm(&api, "app")
            .map(|pem| cert_ders(&pem))
            .is_some_and(
                |ders| ders.contains(&new_root) && ders.contains(&old_root)
            ))
        .await,
        "the bundle carries the new root and keeps the old one: {:?}",
        root_cm(&api, "app")
    );
    let bundle = TrustRoots::new(cert_ders(&root_cm(&api, "app").unwrap())).unwrap();
    // A CSR now is signed by the new key: it chains to the new root alone, not to the old.
    let after = server
        .raw(Some(WAYPOINT), &csr::build(&own).unwrap().pem, None)
        .await
        .expect("issued after the rotation");
    let leaf = first_cert_der(&after.cert_chain[0]).unwrap();
    verify_chain(
        &leaf,
        &[],
        &TrustRoots::new(vec![new_root.clone()]).unwrap(),
    )
    .expect("signed by the new CA");
    assert!(verify_chain(
        &leaf,
        &[],
        &TrustRoots::new(vec![old_root.clone()]).unwrap()
    )
    .is_err());
    // The chain's root element is the bundle, and both generations verify against it.
    let last = cert_ders(after.cert_chain.last().unwrap());
    assert!(
        last.contains(&new_root) && last.contains(&old_root),
        "{last:?}"
    );
    verify_chain(&leaf, &[], &bundle).expect("new leaf verifies against the bundle");
    let old_leaf = first_cert_der(&before.cert_chain[0]).unwrap();
    verify_chain(&old_leaf, &[], &bundle).expect("old leaf still verifies");
    publisher.abort();
    follow_task.abort();
}
