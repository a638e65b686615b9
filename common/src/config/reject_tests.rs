//! Per-resource rejection and fail-closed stand-ins, checked through the loader and the policy
//! decision the proxies make.

use crate::config::load_str;
use crate::identity::Identity;
use crate::l7::attached::{PolicyTarget, Through};
use crate::model::{MtlsMode, OutboundTrafficMode, PolicyAction, PolicyScope};
use crate::policy::{authorize, ConnectionInfo};
use crate::snapshot::{EgressTarget, Snapshot};

const WORKLOADS: &str = r#"
workloads:
- {uid: web, name: web, namespace: default, workloadIps: ["10.0.0.1"], labels: {app: web}}
- {uid: api, name: api, namespace: default, workloadIps: ["10.0.0.2"], labels: {app: api}}
- {uid: db, name: db, namespace: data, workloadIps: ["10.0.0.3"], labels: {app: db}}
"#;

fn load(yaml: &str) -> Snapshot {
    load_str(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn allowed(s: &Snapshot, dst: &str) -> bool {
    let dst = s
        .workloads
        .iter()
        .find(|w| w.name == dst)
        .expect("workload");
    let id = Identity::parse("cluster.local/ns/default/sa/client").expect("identity");
    let conn = ConnectionInfo {
        src_ip: "10.1.1.1".parse().expect("ip"),
        src_identity: Some(&id),
        dst,
        dst_ip: dst.workload_ips[0],
        dst_port: 80,
        via_waypoint: true,
    };
    authorize(s, &conn).is_ok()
}

fn policy(meta: &str, spec: &str) -> String {
    format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {meta}\nspec: {spec}\n")
}

const VALID_VS: &str = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: later}\nspec: {hosts: [web], http: [{route: [{destination: {host: web}}]}]}\n";

#[test]
fn a_bad_deny_policy_is_rejected_alone_and_its_selection_fails_closed() {
    let s = load(&format!(
        "{WORKLOADS}{}{}",
        policy(
            "{name: deny-admin, namespace: default}",
            "{selector: {matchLabels: {app: web}}, action: DENY, rules: [{to: [{operation: {ports: [\"abc\"]}}]}]}"
        ),
        VALID_VS
    ));
    assert_eq!(s.rejected.len(), 1, "{:?}", s.rejected);
    let r = &s.rejected[0];
    assert_eq!(r.document, Some(2));
    assert_eq!(
        r.resource.as_deref(),
        Some("AuthorizationPolicy default/deny-admin")
    );
    assert_eq!(
        r.field.as_deref(),
        Some("spec.rules[0].to[0].operation.ports[0]")
    );
    assert!(
        r.message
            .contains("fail-closed: until it is fixed, a DENY-all stand-in applies to the workloads in namespace default labelled app=web"),
        "{r}"
    );
    // The rest of the file applied.
    assert!(s
        .l7
        .routes
        .mesh("web.default.svc.cluster.local", "default")
        .is_some());
    // The stand-in: DENY-all for the selection only, enforced even for a waypoint's connections.
    let stand_in = &s.authorizations[0];
    assert_eq!(stand_in.action, PolicyAction::Deny);
    assert!(!stand_in.has_l7_rules);
    assert!(!allowed(&s, "web"));
    assert!(allowed(&s, "api"));
    assert!(allowed(&s, "db"));
    // And at the waypoint (L7 form).
    assert_eq!(
        s.l7.authorization_policies["default/deny-admin"].action,
        PolicyAction::Deny
    );
}

#[test]
fn a_bad_allow_policy_fails_closed_too() {
    // Without the stand-in, losing an ALLOW would open `api` to everyone.
    let s = load(&format!(
        "{WORKLOADS}{}",
        policy(
            "{name: api-allow, namespace: default}",
            "{selector: {matchLabels: {app: api}}, rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/99\"]}}]}]}"
        )
    ));
    assert_eq!(s.rejected.len(), 1);
    assert!(!allowed(&s, "api"));
    assert!(allowed(&s, "web"));
}

#[test]
fn an_unreadable_selector_denies_the_namespace() {
    let s = load(&format!(
        "{WORKLOADS}{}",
        policy(
            "{name: p, namespace: default}",
            "{selector: {matchLabels: {version: 1}}, action: DENY, rules: [{}]}"
        )
    ));
    assert!(
        s.rejected[0]
            .message
            .contains("stand-in applies to every workload in namespace default"),
        "{}",
        s.rejected[0]
    );
    assert_eq!(s.authorizations[0].scope, PolicyScope::Namespace);
    assert!(!allowed(&s, "web"));
    assert!(!allowed(&s, "api"));
    assert!(allowed(&s, "db"), "other namespaces are untouched");
}

#[test]
fn a_bad_root_namespace_policy_denies_the_mesh() {
    let s = load(&format!(
        "{WORKLOADS}{}",
        policy("{name: mesh, namespace: istio-system}", "{action: AUDIT}")
    ));
    assert_eq!(s.authorizations[0].scope, PolicyScope::Global);
    assert!(!allowed(&s, "db"));
}

#[test]
fn an_unreadable_namespace_still_fails_the_whole_file() {
    let e = load_str(
        &format!(
            "{WORKLOADS}{}",
            policy("{name: p, namespace: [x]}", "{action: DENY}")
        ),
        "t.yaml",
    )
    .unwrap_err();
    assert!(e.message.contains("whole file is rejected"), "{e}");
    // A YAML syntax error too: nobody can tell what the document was.
    assert!(load_str(&format!("{WORKLOADS}---\nkind: [\n"), "t.yaml").is_err());
}

#[test]
fn a_duplicate_policy_keeps_the_first_and_fails_closed_for_the_second() {
    let s = load(&format!(
        "{WORKLOADS}{}{}",
        policy(
            "{name: p, namespace: default}",
            "{selector: {matchLabels: {app: web}}, rules: [{}]}"
        ),
        policy(
            "{name: p, namespace: default}",
            "{selector: {matchLabels: {app: api}}, rules: [{}]}"
        )
    ));
    assert_eq!(s.rejected.len(), 1);
    assert!(s.rejected[0]
        .message
        .contains("already defined (document 2)"));
    let names: Vec<&str> = s.authorizations.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["p", "p.rejected-document-3"]);
    assert!(allowed(&s, "web"), "the first (ALLOW all for web) stays");
    assert!(!allowed(&s, "api"), "the second's selection fails closed");
    assert_eq!(
        s.l7.authorization_policies["default/p"].action,
        PolicyAction::Allow,
        "the first definition's HTTP form is not replaced"
    );
}

#[test]
fn peer_authentication_and_sidecar_fail_closed() {
    let s = load(&format!(
        "{WORKLOADS}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: pa, namespace: data}}\nspec: {{mtls: {{mode: STRICTER}}}}\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: sc, namespace: default}}\nspec: {{workloadSelector: {{labels: {{app: web}}}}, outboundTrafficPolicy: {{mode: NOPE}}}}\n"
    ));
    assert_eq!(s.rejected.len(), 2, "{:?}", s.rejected);
    assert!(s.rejected[0].message.contains("mTLS is STRICT"));
    let db = s.workloads.iter().find(|w| w.name == "db").expect("db");
    assert_eq!(s.mtls_mode(db, 80), MtlsMode::Strict);
    let web = s.workloads.iter().find(|w| w.name == "web").expect("web");
    let api = s.workloads.iter().find(|w| w.name == "api").expect("api");
    assert_eq!(
        s.sidecars[0].outbound_traffic_policy,
        OutboundTrafficMode::RegistryOnly
    );
    assert!(!s.egress_allowed(web, EgressTarget::Workload(api), 80));
    assert!(!s.egress_allowed(web, EgressTarget::Unknown, 80));
    assert!(s.egress_allowed(api, EgressTarget::Unknown, 80));
}

#[test]
fn unsupported_kinds_are_rejected_alone() {
    let s = load(&format!(
        "{WORKLOADS}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\n{VALID_VS}"
    ));
    assert_eq!(s.rejected.len(), 1);
    assert_eq!(s.rejected[0].field.as_deref(), Some("kind"));
    assert!(s.authorizations.is_empty(), "no stand-in for a non-policy");
    assert!(s
        .l7
        .routes
        .mesh("web.default.svc.cluster.local", "default")
        .is_some());
}

#[test]
fn bad_local_policy_is_rejected_alone_with_a_stand_in() {
    let s = load(&format!(
        "{WORKLOADS}policies:\n- {{name: p, namespace: default, scope: WorkloadSelector, selector: {{app: web}}, action: Allow, rules: [{{clauses: [{{matches: [{{sourceIps: [{{address: 10.0.0.0, length: 40}}]}}]}}]}}]}}\n"
    ));
    assert_eq!(s.rejected.len(), 1);
    assert!(!allowed(&s, "web"));
    assert!(allowed(&s, "api"));
}

#[test]
fn target_refs_attach_policies_to_the_waypoint_not_to_workloads() {
    let s = load(&format!(
        "{WORKLOADS}{}{}",
        policy(
            "{name: gw, namespace: default}",
            "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}"
        ),
        policy(
            "{name: svc, namespace: default}",
            "{targetRef: {kind: Service, group: \"\", name: web}, rules: [{to: [{operation: {methods: [GET]}}]}]}"
        )
    ));
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    assert!(s.authorizations.is_empty(), "ztunnels do not apply them");
    assert!(allowed(&s, "web"));
    let attached = &s.l7.attached_policies;
    assert_eq!(attached.len(), 2);
    assert_eq!(
        attached[0].targets,
        [PolicyTarget::Gateway {
            namespace: "default".into(),
            name: "waypoint".into()
        }]
    );
    let svc = load("services:\n- {name: web, namespace: default, hostname: web.default.svc.cluster.local}\n- {name: other, namespace: default, hostname: other.default.svc.cluster.local}\n");
    let (web_svc, other) = (&*svc.services[0], &*svc.services[1]);
    let wp = Through {
        gateway: Some(("default", "waypoint")),
    };
    let names = |svc| -> Vec<String> {
        s.l7.attached_for(wp, Some(svc))
            .map(|p| p.l7.name.clone())
            .collect()
    };
    assert_eq!(names(web_svc), ["gw", "svc"]);
    assert_eq!(names(other), ["gw"]);
    let elsewhere = Through {
        gateway: Some(("default", "other-waypoint")),
    };
    assert_eq!(s.l7.attached_for(elsewhere, Some(other)).count(), 0);
}

#[test]
fn bad_target_refs_fail_closed() {
    // Readable targets: a DENY-all at that waypoint.
    let s = load(&format!(
        "{WORKLOADS}{}",
        policy(
            "{name: p, namespace: default}",
            "{targetRefs: [{kind: Service, name: web}], action: NOPE}"
        )
    ));
    assert_eq!(s.rejected.len(), 1);
    assert!(
        s.rejected[0]
            .message
            .contains("every request through service web is denied"),
        "{}",
        s.rejected[0]
    );
    assert_eq!(s.l7.attached_policies[0].l7.action, PolicyAction::Deny);
    // An unsupported target: the namespace.
    let s = load(&format!(
        "{WORKLOADS}{}",
        policy(
            "{name: p, namespace: default}",
            "{targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: x}], action: DENY}"
        )
    ));
    assert!(s.rejected[0].message.contains("unsupported target"));
    assert!(!allowed(&s, "web"));
    assert!(!allowed(&s, "api"));
    assert!(allowed(&s, "db"));
    // selector together with targetRefs is an error too.
    let s = load(&format!(
        "{WORKLOADS}{}",
        policy(
            "{name: p, namespace: default}",
            "{selector: {matchLabels: {app: web}}, targetRefs: [{kind: Service, name: web}]}"
        )
    ));
    assert!(s.rejected[0].message.contains("cannot be combined"));
}

#[test]
fn an_unbindable_waypoint_rejects_the_binding_and_the_service_fails_closed() {
    let s = load(
        r#"
workloads:
- {uid: p, name: productpage-v1, namespace: default, workloadIps: [10.244.2.2], protocol: HBONE, node: n2, services: {"default/productpage.default.svc.cluster.local": {9080: 9080}}}
services:
- {name: productpage, namespace: default, hostname: productpage.default.svc.cluster.local, vips: ["/10.96.0.30"], ports: {9080: 9080}, labels: {istio.io/use-waypoint: productpage}}
- {name: other, namespace: default, hostname: other.default.svc.cluster.local, vips: ["/10.96.0.31"], ports: {80: 80}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: productpage, namespace: default}
spec: {gatewayClassName: istio-mesh, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"#,
    );
    assert_eq!(s.rejected.len(), 1, "{:?}", s.rejected);
    let r = &s.rejected[0];
    assert_eq!(
        r.resource.as_deref(),
        Some("service default/productpage.default.svc.cluster.local")
    );
    assert!(r.message.contains("has no waypoint workload"), "{r}");
    assert!(r.message.contains("fail-closed"), "{r}");
    let pp = s
        .services
        .iter()
        .find(|s| s.name == "productpage")
        .expect("kept");
    let wp = pp.waypoint.as_ref().expect("still bound");
    assert!(
        wp.identity.is_none(),
        "no proxy can reach an unresolved waypoint"
    );
    assert_eq!(s.services.len(), 2, "the rest applies");
}
