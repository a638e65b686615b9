//! The certificate service end to end: TokenReview through the fake API server, impersonation
//! by node, CSR checks, and the returned chain verified with webpki.

use crate::ca_support::*;
use common::identity::ca::cert_ders;
use common::identity::{csr, Identity};
use common::tls::{identities_of, verify_chain, TrustRoots};
use fake_apiserver::TokenInfo;
use std::time::Duration;
use tonic::Code;

fn roots(s: &CaServer) -> TrustRoots {
    TrustRoots::new(vec![s.ca.root_der().clone()]).unwrap()
}

#[tokio::test]
async fn ca_ztunnel_gets_a_certificate_for_a_pod_on_its_node() {
    let api = cluster().await;
    let server = CaServer::start(&api, test_config(), any_port()).await;
    let web = Identity::new(TD, "app", "web");
    let issued = server
        .client(ZTUNNEL_A)
        .fetch(&web, &roots(&server))
        .await
        .expect("issued for a pod on node-a");
    // Independently of the client's own checks: webpki chain to the root, URI SAN, critical.
    let leaf = &issued.chain[0];
    verify_chain(leaf, &[], &roots(&server)).expect("chains to the mesh root");
    assert_eq!(identities_of(leaf).unwrap(), vec![web]);
    let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    let san = x.subject_alternative_name().unwrap().expect("SAN");
    assert!(
        san.critical,
        "URI SAN must be critical with an empty subject"
    );
    assert!(x.subject().iter().next().is_none());
    // Asked for an hour, got an hour (within the 24 h cap).
    let life = issued.not_after.duration_since(issued.not_before).unwrap();
    assert!(
        life >= Duration::from_secs(3600) && life <= Duration::from_secs(3700),
        "{life:?}"
    );
}

#[tokio::test]
async fn ca_ztunnel_cannot_impersonate_a_pod_on_another_node() {
    let api = cluster().await;
    let server = CaServer::start(&api, test_config(), any_port()).await;
    let db = Identity::new(TD, "app", "db"); // runs on node-b only
    let csr = csr::build(&db).unwrap();
    let err = server
        .raw(Some(ZTUNNEL_A), &csr.pem, Some(&db.to_string()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        err.message(),
        "request impersonation authentication failure"
    );
    // Once a db pod lands on node-a, the same request succeeds (the reflector sees it).
    api.create(pod("app", "db-2", "db2-uid", "db", "node-a"))
        .unwrap();
    let mut ok = false;
    for _ in 0..40 {
        let csr = csr::build(&db).unwrap();
        if server
            .raw(Some(ZTUNNEL_A), &csr.pem, Some(&db.to_string()))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ok,
        "impersonation allowed once a db pod runs on the caller's node"
    );
}

#[tokio::test]
async fn ca_csr_whose_san_does_not_match_is_refused() {
    let api = cluster().await;
    let server = CaServer::start(&api, test_config(), any_port()).await;
    // The waypoint asks (for itself) with a CSR naming another identity.
    let csr = csr::build(&Identity::new(TD, "app", "web")).unwrap();
    let err = server
        .raw(Some(WAYPOINT), &csr.pem, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("do not match"), "{}", err.message());
    // The ztunnel impersonating web with a CSR for db.
    let csr = csr::build(&Identity::new(TD, "app", "db")).unwrap();
    let web = Identity::new(TD, "app", "web").to_string();
    let err = server
        .raw(Some(ZTUNNEL_A), &csr.pem, Some(&web))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Garbage CSR.
    let err = server
        .raw(Some(WAYPOINT), "garbage", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn ca_invalid_expired_and_wrong_audience_tokens_are_unauthenticated() {
    let api = cluster().await;
    let mut expired = sa_token("app", "waypoint", "waypoint-1", "wp-uid");
    expired.expired = true;
    api.add_token("expired", expired);
    let mut wrong_aud = sa_token("app", "waypoint", "waypoint-1", "wp-uid");
    wrong_aud.audiences = vec!["some-other-audience".into()];
    api.add_token("wrong-aud", wrong_aud);
    api.add_token(
        "not-a-sa",
        TokenInfo {
            username: "alice".into(),
            audiences: vec!["istio-ca".into()],
            ..Default::default()
        },
    );
    let server = CaServer::start(&api, test_config(), any_port()).await;
    let id = Identity::new(TD, "app", "waypoint");
    for token in [
        Some("expired"),
        Some("wrong-aud"),
        Some("unknown"),
        Some("not-a-sa"),
        None,
    ] {
        let csr = csr::build(&id).unwrap();
        let err = server.raw(token, &csr.pem, None).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err}");
    }
}

#[tokio::test]
async fn ca_waypoint_gets_only_its_own_identity() {
    let api = cluster().await;
    let server = CaServer::start(&api, test_config(), any_port()).await;
    let own = Identity::new(TD, "app", "waypoint");
    let csr = csr::build(&own).unwrap();
    let resp = server
        .raw(Some(WAYPOINT), &csr.pem, None)
        .await
        .expect("own identity");
    assert_eq!(resp.cert_chain.len(), 2, "leaf + root bundle");
    assert_eq!(resp.cert_chain[1], server.ca.root_pem());
    let leaf = cert_ders(&resp.cert_chain[0]).remove(0);
    assert_eq!(identities_of(&leaf).unwrap(), vec![own.clone()]);
    // Naming itself as ImpersonatedIdentity is the same as not impersonating.
    let csr = csr::build(&own).unwrap();
    server
        .raw(Some(WAYPOINT), &csr.pem, Some(&own.to_string()))
        .await
        .expect("own identity via metadata");
    // The waypoint is not a node agent: no one else's identity, even on its node.
    let db = Identity::new(TD, "app", "db");
    let csr = csr::build(&db).unwrap();
    let err = server
        .raw(Some(WAYPOINT), &csr.pem, Some(&db.to_string()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn ca_token_reviews_are_cached() {
    let api = cluster().await;
    let server = CaServer::start(&api, test_config(), any_port()).await;
    let own = Identity::new(TD, "app", "waypoint");
    api.clear_requests();
    for _ in 0..5 {
        let csr = csr::build(&own).unwrap();
        server
            .raw(Some(WAYPOINT), &csr.pem, None)
            .await
            .expect("issued");
    }
    let reviews = api
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/tokenreviews"))
        .count();
    assert_eq!(reviews, 1, "five requests, one TokenReview");
}

#[tokio::test]
async fn ca_ttl_is_capped_and_floored() {
    let api = cluster().await;
    let mut cfg = test_config();
    cfg.max_ttl = Duration::from_secs(600);
    let server = CaServer::start(&api, cfg, any_port()).await;
    let own = Identity::new(TD, "app", "waypoint");
    for (asked, lo, hi) in [(86400, 600, 700), (1, 60, 120)] {
        let mut c = server.client_config(WAYPOINT, Duration::from_secs(asked));
        c.own_identity = Some(own.clone());
        let issued = common::identity::caclient::CaClient::new(c)
            .unwrap()
            .fetch(&own, &roots(&server))
            .await
            .unwrap();
        let life = issued
            .not_after
            .duration_since(issued.not_before)
            .unwrap()
            .as_secs();
        assert!(life >= lo && life <= hi, "asked {asked}s, got {life}s");
    }
}
