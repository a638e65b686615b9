//! One bad document no longer freezes the mesh: an AuthorizationPolicy the loader cannot accept
//! is rejected alone (listed under `rejected` in `/config_dump`), the rest of the file and every
//! later change still apply, and the workloads the rejected policy selects fail closed until it
//! is fixed. A policy attached with `targetRefs` is accepted (enforced at the waypoint).

use std::time::Duration;
use tests::apps::{echo_server, probe_echo, Outcome};
use tests::config::Service;
use tests::mesh::{echo_vip, standard_config, Mesh};
use tests::support::{any, eventually};

const RELOAD: Duration = Duration::from_secs(15);

/// A DENY policy for `b` (app=server) with a bad port: rejected, replaced by a DENY-all for b.
const BAD_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-deny-9999, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - to: [{operation: {ports: ["not-a-port"]}}]
"#;

const FIXED_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-deny-9999, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - to: [{operation: {ports: ["9999"]}}]
"#;

/// Attached to a waypoint: accepted (it used to fail the whole file).
const TARGET_REF_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-the-waypoint, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin"]}}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_policy_is_rejected_alone_and_later_changes_still_apply() {
    let mesh = Mesh::two_nodes("reload-reject", &standard_config())
        .await
        .unwrap();
    let _server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let a = mesh.pod("a").ns.handle();
    assert_eq!(
        probe_echo(&a, echo_vip(), Duration::from_secs(5)).await,
        Outcome::Echoed
    );

    // The bad policy, a targetRefs policy and a new service in one file.
    let with_bad = standard_config()
        .service(Service::new("echo2", "10.96.0.11").port(80, 9000))
        .document(TARGET_REF_POLICY)
        .document(BAD_POLICY);
    mesh.write_config(&with_bad).unwrap();
    mesh.wait_config(RELOAD, |dump| dump.contains("10.96.0.11"))
        .await
        .expect("the rest of the file applies");
    for z in &mesh.ztunnels {
        let dump: serde_json::Value =
            serde_json::from_str(&z.config_dump().await.unwrap()).unwrap();
        let rejected = dump["config"]["rejected"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(rejected.len(), 1, "{}: {rejected:?}", z.node);
        let r = &rejected[0];
        assert_eq!(
            r["resource"], "AuthorizationPolicy default/server-deny-9999",
            "{r}"
        );
        assert_eq!(r["document"], 3, "{r}");
        assert_eq!(r["field"], "spec.rules[0].to[0].operation.ports[0]", "{r}");
        assert!(
            r["message"].as_str().unwrap_or("").contains("fail-closed"),
            "{r}"
        );
    }
    // Fail closed: b is denied while the policy is broken.
    let ah = &a;
    let denied = eventually(Duration::from_secs(10), || async move {
        Ok(probe_echo(ah, echo_vip(), Duration::from_secs(5)).await != Outcome::Echoed)
    })
    .await
    .unwrap();
    assert!(
        denied,
        "the workload selected by the rejected DENY policy stayed open"
    );

    // A later change with the bad policy still in the file applies too.
    let later = with_bad
        .clone()
        .service(Service::new("echo3", "10.96.0.12").port(80, 9000));
    mesh.write_config(&later).unwrap();
    mesh.wait_config(RELOAD, |dump| dump.contains("10.96.0.12"))
        .await
        .expect("a later change applies despite the rejected policy");

    // Fixing the policy lifts the stand-in.
    let fixed = standard_config()
        .service(Service::new("echo2", "10.96.0.11").port(80, 9000))
        .service(Service::new("echo3", "10.96.0.12").port(80, 9000))
        .document(TARGET_REF_POLICY)
        .document(FIXED_POLICY);
    mesh.write_config(&fixed).unwrap();
    mesh.wait_config(RELOAD, |dump| {
        dump.contains("\"rejected\":[]") || !dump.contains("not-a-port")
    })
    .await
    .unwrap();
    let open = eventually(Duration::from_secs(10), || async move {
        Ok(probe_echo(ah, echo_vip(), Duration::from_secs(5)).await == Outcome::Echoed)
    })
    .await
    .unwrap();
    assert!(open, "traffic did not resume once the policy was fixed");
}
