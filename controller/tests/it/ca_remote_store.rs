//! The proxies' cluster-mode certificate store against the real certificate service over TLS:
//! a connection waits for the first certificate, concurrent requests share one fetch, and when
//! the CA goes away a failed renewal keeps the still-valid certificate until the CA is back.

use crate::ca_support::*;
use common::identity::caclient::CaClient;
use common::identity::store::{CertError, CertStore, RemoteOptions};
use common::identity::Identity;
use common::tls::TrustRoots;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

fn store(server: &CaServer, ttl: Duration, own: &Identity) -> Arc<CertStore> {
    let mut cfg = server.client_config(WAYPOINT, ttl);
    cfg.own_identity = Some(own.clone());
    let client = CaClient::new(cfg).unwrap();
    let roots = TrustRoots::new(vec![server.ca.root_der().clone()]).unwrap();
    Arc::new(CertStore::remote(
        client,
        roots,
        TD,
        RemoteOptions {
            wait: Duration::from_secs(5),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
        },
    ))
}

#[tokio::test]
async fn ca_remote_store_waits_for_the_first_certificate_single_flight() {
    let api = cluster().await;
    let server = CaServer::start(&api, test_config(), any_port()).await;
    let own = Identity::new(TD, "app", "waypoint");
    let certs = store(&server, Duration::from_secs(3600), &own);
    // Without waiting: not there yet, a fetch starts.
    assert!(matches!(certs.get(&own), Err(CertError::Pending(_))));
    let (a, b) = tokio::join!(certs.get_wait(&own), certs.get_wait(&own));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.generation, b.generation, "one fetch served both");
    assert_eq!(certs.get(&own).unwrap().generation, a.generation);
    assert_eq!(certs.cert_expiry_seconds().len(), 1);
    // A proxy may not get another identity: the wait ends with the CA's refusal.
    let other = Identity::new(TD, "app", "web");
    let err = certs.get_wait(&other).await.unwrap_err().to_string();
    assert!(err.contains("impersonation"), "{err}");
}

#[tokio::test]
async fn ca_remote_store_keeps_the_valid_certificate_when_renewal_fails() {
    let api = cluster().await;
    let mut cfg = test_config();
    cfg.min_ttl = Duration::from_secs(1);
    let mut server = CaServer::start(&api, cfg.clone(), any_port()).await;
    let addr = server.addr;
    let own = Identity::new(TD, "app", "waypoint");
    let certs = store(&server, Duration::from_secs(4), &own);
    let first = certs.get_wait(&own).await.expect("first certificate");
    assert_eq!(first.generation, 1);

    // The CA goes away; past half-life the renewal starts and fails.
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert!(first.needs_rotation(SystemTime::now()));
    assert_eq!(certs.rotate_due(std::slice::from_ref(&own)), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Still served: same certificate, still valid.
    let current = certs.get(&own).expect("old certificate kept");
    assert_eq!(current.generation, first.generation);
    assert!(current.is_valid(SystemTime::now()));

    // The CA is back on the same address: the retrying renewal installs a new certificate.
    let ca = server.ca.clone();
    let _server = CaServer::start_with(&api, cfg, addr, ca).await;
    assert!(
        eventually(Duration::from_secs(3), || certs
            .get(&own)
            .is_ok_and(|c| c.generation > first.generation))
        .await,
        "renewed after the CA came back"
    );
}

#[tokio::test]
async fn ca_remote_store_does_not_serve_an_expired_certificate() {
    let api = cluster().await;
    let mut cfg = test_config();
    cfg.min_ttl = Duration::from_secs(1);
    let mut server = CaServer::start(&api, cfg, any_port()).await;
    let own = Identity::new(TD, "app", "waypoint");
    let certs = store(&server, Duration::from_secs(1), &own);
    certs.get_wait(&own).await.expect("first certificate");
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        certs.get(&own).is_err(),
        "expired certificates are not served"
    );
    let err = certs.get_wait(&own).await.unwrap_err();
    assert!(matches!(err, CertError::Fetch(..)), "{err}");
}
