//! Tests of the configuration loader: document splitting, the local form, Istio resources,
//! cross-document validation, error messages, and the shared scenario files.

use super::*;
use crate::model::{
    MtlsMode, OutboundTrafficMode, PolicyAction, PolicyScope, Protocol, StringMatch,
};
use crate::snapshot::EgressTarget;
use std::path::PathBuf;

fn load(yaml: &str) -> Snapshot {
    match load_str(yaml, "test.yaml") {
        Ok(s) => s,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn load_err(yaml: &str) -> String {
    match load_str(yaml, "test.yaml") {
        Ok(_) => panic!("expected an error for:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

/// The one rejection of a file that loads (the rest of it applied).
fn rejected(yaml: &str) -> String {
    let s = load(yaml);
    match s.rejected.as_slice() {
        [one] => one.to_string(),
        other => panic!("expected one rejection, got {other:?} for:\n{yaml}"),
    }
}

fn scenario(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/scenarios");
    assert!(
        dir.is_dir(),
        "scenario directory {} is missing (expected the shared/ checkout beside the repository)",
        dir.display()
    );
    dir.join(name)
}

fn load_scenario(name: &str) -> Snapshot {
    match load_file(&scenario(name)) {
        Ok(s) => s,
        Err(e) => panic!("scenario {name} must load unchanged: {e}"),
    }
}

#[test]
fn empty_and_comment_only_files_are_empty_snapshots() {
    for text in [
        "",
        "\n\n",
        "# just a comment\n  # another\n",
        "---\n",
        "---\n# c\n---\n",
        "%YAML 1.2\n---\n",
    ] {
        let s = load(text);
        assert!(
            s.workloads.is_empty() && s.services.is_empty() && s.authorizations.is_empty(),
            "{text:?}"
        );
        assert_eq!(s.root_namespace, "istio-system");
        assert_eq!(s.trust_domain, "cluster.local");
        assert_eq!(s.outbound_traffic_policy, OutboundTrafficMode::AllowAny);
    }
}

#[test]
fn document_splitting_and_numbering() {
    let docs =
        split_documents("# header\n---\na: 1\n--- {b: 2}\n...\n# trailing\n---\n\n---\nc: 3\n");
    let summary: Vec<(usize, usize, String)> = docs
        .iter()
        .map(|d| (d.index, d.first_line, d.text.trim().to_string()))
        .collect();
    assert_eq!(
        summary,
        [
            (1, 2, "a: 1".to_string()),
            (2, 4, "{b: 2}".to_string()),
            (3, 7, String::new()),
            (4, 9, "c: 3".to_string())
        ]
    );
    let docs = split_documents("a: 1\n---\nb: 2\n----x: not a marker\n");
    assert_eq!(docs.len(), 2);
    assert!(docs[1].text.contains("----x"));
}

const LOCAL: &str = r#"
# Istio ztunnel local config, plus meshConfig.
workloads:
- uid: cluster1//v1/Pod/default/web
  name: web
  namespace: default
  serviceAccount: web
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
  node: node1
  services:
    "default/web.default.svc.cluster.local":
      80: 8080
  waypoint: {destination: "/10.0.0.9"}
- name: waypoint
  namespace: default
  serviceAccount: waypoint
  trustDomain: other.example
  workloadIps: ["10.0.0.9"]
  node: node2
services:
- name: web
  namespace: default
  hostname: web.default.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {80: 8080}
  waypoint: {destination: "/10.0.0.9", hboneMtlsPort: 15008}
meshConfig:
  trustDomain: example.org
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"#;

#[test]
fn local_form_loads() {
    let s = load(LOCAL);
    assert_eq!(s.workloads.len(), 2);
    let web = s
        .workload_by_ip("10.0.0.1".parse().expect("ip"))
        .expect("web");
    assert_eq!(web.protocol, Protocol::Hbone);
    assert_eq!(
        web.trust_domain, "example.org",
        "meshConfig trustDomain is the default"
    );
    let wp = web.waypoint.as_ref().expect("waypoint");
    assert_eq!(wp.hbone_mtls_port, 15006);
    assert_eq!(
        wp.identity.as_ref().map(|i| i.to_string()).as_deref(),
        Some("spiffe://other.example/ns/default/sa/waypoint")
    );
    let svc = s
        .service_by_vip("10.96.0.10".parse().expect("ip"))
        .expect("svc")
        .clone();
    assert_eq!(
        svc.waypoint.as_ref().map(|w| w.hbone_mtls_port),
        Some(15008)
    );
    assert!(svc
        .waypoint
        .as_ref()
        .and_then(|w| w.identity.as_ref())
        .is_some());
    assert_eq!(s.endpoints(&svc, 80).len(), 1);
    assert_eq!(s.endpoints(&svc, 80)[0].target_port, 8080);
    assert_eq!(s.trust_domain, "example.org");
    assert_eq!(s.root_namespace, "istio-system");
    assert_eq!(s.outbound_traffic_policy, OutboundTrafficMode::RegistryOnly);
    assert!(!s.egress_allowed(web, EgressTarget::Unknown, 80));
}

#[test]
fn local_form_errors_name_file_document_and_key() {
    let e = load_err("---\nworkloads: []\n---\nworkload: []\n");
    assert!(
        e.starts_with("test.yaml: document 2: unknown field `workload`"),
        "{e}"
    );
    assert!(e.contains("line 4"), "absolute line number: {e}");
    let e = load_err("workloads:\n- name: a\n  workloadIps: [\"10.0.0.300\"]\n");
    assert!(
        e.contains("workloads[0].workloadIps[0]") && e.contains("line 3"),
        "{e}"
    );
    let e = load_err("meshConfig: {rootNamespace: x, color: blue}\n");
    assert!(e.contains("meshConfig: unknown field `color`"), "{e}");
    let e = load_err("meshConfig: {}\n---\nmeshConfig: {}\n");
    assert_eq!(
        e,
        "test.yaml: document 2: meshConfig: given twice (first in document 1)"
    );
    let e = load_err("a: [1\n");
    assert!(
        e.starts_with("test.yaml: document 1: ") && e.contains("line"),
        "{e}"
    );
    let e = load_err("- just\n- a list\n");
    assert!(e.contains("expected a mapping"), "{e}");
    // A local policy that parses but fails its checks is rejected alone (fail-closed stand-in).
    let e = rejected(
        "policies:\n- {name: p, scope: Namespace, action: Allow, rules: [{clauses: [{matches: [{principals: [{exact: a, prefix: b}]}]}]}]}\n",
    );
    assert!(e.contains("(policy default/p): policies[0].rules[0].clauses[0].matches[0].principals[0]: set exactly one"), "{e}");
    let e = rejected("policies:\n- {name: p, scope: Namespace, action: Allow, rules: [{clauses: [{matches: [{sourceIps: [{address: 10.0.0.0, length: 40}]}]}]}]}\n");
    assert!(e.contains("sourceIps[0]: prefix length 40"), "{e}");
}

#[test]
fn workload_and_service_validation() {
    let e = load_err("workloads:\n- {name: a, workloadIps: [\"10.0.0.1\"]}\n---\nworkloads:\n- {name: b, namespace: x, workloadIps: [\"10.0.0.2\", \"10.0.0.1\"]}\n");
    assert_eq!(e, "test.yaml: document 2 (workload x/b): workloads[0].workloadIps[1]: 10.0.0.1 is already used by workload default/a (document 1)");
    let e = load_err("workloads:\n- {uid: u1, name: a}\n- {uid: u1, name: b}\n");
    assert!(
        e.contains("workloads[1].uid: uid \"u1\" is already used"),
        "{e}"
    );
    let e = load_err("services:\n- {name: s, hostname: s.default, vips: [\"10.96.0.1/32\"]}\n");
    assert!(
        e.contains("(service default/s.default): services[0].vips[0]: \"10.96.0.1/32\" is not"),
        "{e}"
    );
    let e = load_err("services:\n- {name: s, hostname: s1, vips: [\"/10.96.0.1\"]}\n- {name: t, hostname: t1, vips: [\"net/10.96.0.1\"]}\n");
    assert!(
        e.contains("services[1].vips[0]: VIP 10.96.0.1 is already claimed by service default/s1"),
        "{e}"
    );
    let e = load_err("services:\n- {name: s, hostname: s1}\n- {name: s, hostname: s1}\n");
    assert!(e.contains("service default/s1 is already defined"), "{e}");
    // A workload naming an unknown service is only a warning.
    let s = load("workloads:\n- {name: a, services: {\"default/nope\": {80: 80}}}\n");
    assert_eq!(s.workloads.len(), 1);
}

#[test]
fn waypoint_resolution() {
    let e = load_err("workloads:\n- {name: a, waypoint: {destination: \"/10.9.9.9\"}}\n");
    assert!(e.contains("(workload default/a): workloads[0].waypoint.destination: \"/10.9.9.9\": names no known workload IP"), "{e}");
    let e = load_err("workloads:\n- {name: a, waypoint: {destination: waypoint.default.svc}}\n");
    assert!(
        e.contains("waypoint.destination: \"waypoint.default.svc\" is not"),
        "{e}"
    );
    // Through a waypoint Service VIP: its endpoints' common identity.
    let s = load(
        r#"
workloads:
- {name: a, waypoint: {destination: "/10.96.0.99"}}
- {name: wp-1, serviceAccount: wp, workloadIps: ["10.0.0.8"], services: {"default/wp.default.svc.cluster.local": {15008: 15008}}}
- {name: wp-2, serviceAccount: wp, workloadIps: ["10.0.0.9"], services: {"default/wp.default.svc.cluster.local": {15008: 15008}}}
services:
- {name: wp, hostname: wp.default.svc.cluster.local, vips: ["/10.96.0.99"], ports: {15008: 15008}}
"#,
    );
    let id = s.workloads[0]
        .waypoint
        .as_ref()
        .and_then(|w| w.identity.as_ref())
        .map(|i| i.principal());
    assert_eq!(id.as_deref(), Some("cluster.local/ns/default/sa/wp"));

    // A waypoint Service with no endpoint (scaled to zero, not ready yet) is a state, not an
    // error: the binding stays, without an identity, and ztunnel refuses the traffic.
    let s = load(
        r#"
workloads:
- {name: a, waypoint: {destination: "/10.96.0.99"}}
services:
- {name: wp, hostname: wp.default.svc.cluster.local, vips: ["/10.96.0.99"], ports: {15008: 15008}}
"#,
    );
    let wp = s.workloads[0].waypoint.as_ref().expect("binding kept");
    assert_eq!(wp.destination, "/10.96.0.99");
    assert!(wp.identity.is_none());
}

#[test]
fn istio_authorization_policy_compiles() {
    let s = load(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a}
spec:
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/x/sa/y"], notNamespaces: [z]}
    - source: {remoteIpBlocks: ["10.0.0.0/8"], notIpBlocks: ["10.1.2.3"], serviceAccounts: ["ns1/sa1"]}
    to:
    - operation: {ports: ["80", 443], notPorts: ["8080"]}
    when:
    - {key: destination.ip, values: ["10.96.0.0/12"]}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: b, namespace: istio-system}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c, namespace: ns1}
spec: {selector: {matchLabels: {app: x}}, rules: [{}]}
"#,
    );
    let a = &s.authorizations[0];
    assert_eq!(
        (a.namespace.as_str(), a.scope, a.action),
        ("default", PolicyScope::Namespace, PolicyAction::Deny)
    );
    assert_eq!(a.rules.len(), 1);
    let clauses = &a.rules[0].clauses;
    assert_eq!(clauses.len(), 3);
    assert_eq!(clauses[0].matches.len(), 2);
    assert_eq!(
        clauses[0].matches[1].principals,
        [StringMatch::Plain("*/ns/ns1/sa/sa1".into())]
    );
    assert_eq!(clauses[0].matches[1].source_ips.len(), 1);
    assert_eq!(clauses[1].matches[0].destination_ports, [80, 443]);
    assert_eq!(clauses[1].matches[0].not_destination_ports, [8080]);
    assert_eq!(clauses[2].matches[0].destination_ips.len(), 1);
    assert!(!a.has_l7_rules);
    let b = &s.authorizations[1];
    assert_eq!(
        (b.scope, b.action, b.rules.len()),
        (PolicyScope::Global, PolicyAction::Allow, 0)
    );
    let c = &s.authorizations[2];
    assert_eq!(c.scope, PolicyScope::WorkloadSelector);
    assert_eq!(c.selector.get("app").map(String::as_str), Some("x"));
    assert_eq!(c.rules.len(), 1);
    assert!(c.rules[0].clauses.is_empty());
}

#[test]
fn root_namespace_from_mesh_config_decides_global_scope() {
    let s = load("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: mesh-root}\nspec: {}\n---\nmeshConfig: {rootNamespace: mesh-root}\n");
    assert_eq!(s.authorizations[0].scope, PolicyScope::Global);
}

#[test]
fn istio_resource_errors() {
    let deny = |ports: &str| {
        format!("workloads: []\n---\nmeshConfig: {{}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-9999\n  namespace: default\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [{ports}]\n")
    };
    assert!(
        rejected(&deny("\"abc\"")).starts_with(
        "test.yaml: document 3 (AuthorizationPolicy default/deny-9999): spec.rules[0].to[0].operation.ports[0]: \"abc\" is not a port number; fail-closed"
    ));
    assert!(rejected(&deny("\"80\", 70000"))
        .contains("ports[1]: 70000 is not a port number; fail-closed"));
    let ap = |spec: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: ns}}\nspec: {spec}\n")
    };
    let e = rejected(&ap("{action: AUDIT}"));
    assert_eq!(e, "test.yaml: document 1 (AuthorizationPolicy ns/p): spec.action: action AUDIT is not supported by the L4 data plane (use ALLOW or DENY); fail-closed: until it is fixed, a DENY-all stand-in applies to every workload in namespace ns");
    assert!(
        rejected(&ap("{action: CUSTOM, provider: {name: x}}")).contains("CUSTOM is not supported")
    );
    let e = rejected(&ap("{rules: [{from: [{source: {principal: [x]}}]}]}"));
    assert!(
        e.contains(
            "spec.rules[0].from[0].source.principal: unknown field (expected one of: principals,"
        ),
        "{e}"
    );
    let e = rejected(&ap("{rules: [{when: [{key: source.color, values: [x]}]}]}"));
    assert!(
        e.contains("spec.rules[0].when[0].key: unknown condition key \"source.color\""),
        "{e}"
    );
    let e = rejected(&ap("{rules: [{when: [{key: source.ip}]}]}"));
    assert!(e.contains("needs values or notValues"), "{e}");
    let e = rejected(&ap(
        "{rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]}]}",
    ));
    assert!(
        e.contains("source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP address or CIDR block"),
        "{e}"
    );
    let e = rejected(&ap(
        "{rules: [{from: [{source: {serviceAccounts: [nosep]}}]}]}",
    ));
    assert!(e.contains("serviceAccounts[0]: \"nosep\" is not"), "{e}");
    let e = rejected(&ap("{targetRefs: [{kind: Gateway, name: wp}]}"));
    assert!(
        e.contains("spec.targetRefs[0]: unsupported target \"\" \"Gateway\""),
        "{e}"
    );
    let e = rejected(&ap("{selector: {matchLabels: {version: 1}}}"));
    assert!(
        e.contains("spec.selector.matchLabels.version: label values must be strings"),
        "{e}"
    );
    let e = rejected(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {namespace: x}\n",
    );
    assert_eq!(
        e,
        "test.yaml: document 1 (AuthorizationPolicy): metadata.name: missing; fail-closed: until it is fixed, a DENY-all stand-in applies to every workload in namespace x"
    );
    let e = rejected("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspecs: {}\n");
    assert!(e.contains("specs: unknown field"), "{e}");
    let e = rejected(
        "apiVersion: security.istio.io/v1alpha9\nkind: AuthorizationPolicy\nmetadata: {name: p}\n",
    );
    assert!(e.contains("apiVersion: unsupported version"), "{e}");
    let e = rejected("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: p}\n");
    assert!(
        e.starts_with(
            "test.yaml: document 1 (ConfigMap): kind: unsupported kind \"ConfigMap\" (apiVersion v1)"
        ),
        "{e}"
    );
    assert!(load_err("kind: Pod\n").contains("apiVersion: missing"));
    assert!(load_err("apiVersion: v1\n").contains("kind: missing"));
    let e = rejected(&format!("{}---\n{}", ap("{}"), ap("{}")));
    assert!(e.contains("document 2 (AuthorizationPolicy ns/p): metadata.name: authorization policy ns/p is already defined (document 1)"), "{e}");
}

#[test]
fn peer_authentication_compiles() {
    let s = load(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: web, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: UNSET}
  portLevelMtls:
    8080: {mode: DISABLE}
    "9090": {mode: PERMISSIVE}
    "7070": {mode: UNSET}
---
workloads:
- {name: web, labels: {app: web}}
"#,
    );
    assert_eq!(s.peer_authentications[0].mode, Some(MtlsMode::Strict));
    let web_pa = &s.peer_authentications[1];
    assert_eq!(web_pa.mode, None);
    assert_eq!(web_pa.port_level.len(), 2);
    let w = s.workloads[0].clone();
    assert_eq!(s.mtls_mode(&w, 8080), MtlsMode::Disable);
    assert_eq!(s.mtls_mode(&w, 9090), MtlsMode::Permissive);
    assert_eq!(s.mtls_mode(&w, 7070), MtlsMode::Strict);
    let pa = |spec: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p}}\nspec: {spec}\n")
    };
    assert!(rejected(&pa("{mtls: {mode: STRICTER}}"))
        .contains("spec.mtls.mode: unknown mode \"STRICTER\""));
    assert!(rejected(&pa("{portLevelMtls: {80: {mode: STRICT}}}"))
        .contains("portLevelMtls requires a selector"));
    let e = rejected(&pa(
        "{selector: {matchLabels: {a: b}}, portLevelMtls: {http: {mode: STRICT}}}",
    ));
    assert!(
        e.contains("spec.portLevelMtls.http: \"http\" is not a port number"),
        "{e}"
    );
}

#[test]
fn sidecar_compiles() {
    let s = load(
        r#"
meshConfig: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec:
  egress: [{hosts: ["*/*"]}]
"#,
    );
    let sc = &s.sidecars[0];
    assert_eq!(
        sc.outbound_traffic_policy,
        OutboundTrafficMode::RegistryOnly,
        "mesh default fills an unset mode"
    );
    assert_eq!(sc.egress[0].port, None);
    let sc = |spec: &str| {
        format!("apiVersion: networking.istio.io/v1beta1\nkind: Sidecar\nmetadata: {{name: s}}\nspec: {spec}\n")
    };
    assert!(rejected(&sc("{egress: [{hosts: [foo.com]}]}"))
        .contains("spec.egress[0].hosts[0]: \"foo.com\" is not \"<namespace>/<host>\""));
    assert!(rejected(&sc("{egress: [{port: {number: 8080}}]}"))
        .contains("spec.egress[0].hosts: an egress listener needs"));
    assert!(rejected(&sc("{outboundTrafficPolicy: {mode: DENY_ALL}}"))
        .contains("unknown mode \"DENY_ALL\""));
    assert!(
        rejected(&sc("{egress: [{port: {number: x}, hosts: [\"./*\"]}]}"))
            .contains("spec.egress[0].port.number: \"x\" is not a port number")
    );
}

#[test]
fn policies_scenario_loads_unchanged() {
    let s = load_scenario("policies.yaml");
    assert_eq!(s.peer_authentications.len(), 1);
    assert_eq!(s.peer_authentications[0].mode, Some(MtlsMode::Strict));
    let names: Vec<&str> = s.authorizations.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "demoapp-from-proxy-only",
            "deny-9999",
            "productpage-get-only"
        ]
    );
    let from_proxy = &s.authorizations[0];
    assert_eq!(from_proxy.scope, PolicyScope::WorkloadSelector);
    assert_eq!(from_proxy.rules[0].clauses.len(), 2);
    let deny = &s.authorizations[1];
    assert_eq!(
        (deny.scope, deny.action),
        (PolicyScope::Namespace, PolicyAction::Deny)
    );
    let get_only = &s.authorizations[2];
    assert!(
        get_only.has_l7_rules && get_only.rules.is_empty(),
        "L7-only ALLOW admits nothing at L4"
    );
}

#[test]
fn sidecar_egress_scenario_loads_unchanged() {
    let s = load_scenario("sidecar-egress.yaml");
    assert_eq!(s.sidecars.len(), 1);
    let sc = &s.sidecars[0];
    assert_eq!(
        (sc.name.as_str(), sc.namespace.as_str()),
        ("client", "default")
    );
    assert_eq!(sc.selector.get("run").map(String::as_str), Some("client"));
    assert_eq!(
        sc.outbound_traffic_policy,
        OutboundTrafficMode::RegistryOnly
    );
    assert_eq!(sc.egress.len(), 1);
    assert_eq!(sc.egress[0].port, Some(8080));
    assert_eq!(sc.egress[0].hosts, ["./*"]);
}

#[test]
fn all_scenarios_load() {
    let dir = scenario("");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    entries.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    entries.sort();
    assert!(!entries.is_empty(), "no scenarios in {}", dir.display());
    for path in entries {
        if let Err(e) = load_file(&path) {
            panic!("{e}");
        }
    }
    let demo = load_scenario("demoapp.yaml");
    assert_eq!(demo.other_resources.len(), 5);
    assert_eq!(demo.other_resources[0]["kind"], "Deployment");
}

#[test]
fn missing_file_error_names_it() {
    let e = load_file(Path::new("/nonexistent/config.yaml")).expect_err("missing");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/config.yaml: cannot read:"),
        "{e}"
    );
}

#[test]
fn yaml_line_numbers_are_absolute() {
    assert_eq!(
        shift_lines(
            "bad at line 3 column 5, while parsing at line 2 column 1",
            10
        ),
        "bad at line 13 column 5, while parsing at line 12 column 1"
    );
    assert_eq!(shift_lines("no numbers: line x", 3), "no numbers: line x");
    let e = load_err("workloads: []\n---\nservices: []\n---\nc: {d: [1}\n");
    assert!(
        e.starts_with("test.yaml: document 3: ") && e.contains("line 5"),
        "{e}"
    );
}

#[test]
fn port_map_keys_may_be_strings_or_numbers() {
    let s = load(
        r#"{"workloads": [{"name": "a", "services": {"default/h": {"80": 8080}}}], "services": [{"name": "s", "hostname": "h", "ports": {"80": 0, 443: 8443}}]}"#,
    );
    assert_eq!(
        s.workloads[0]
            .services
            .get("default/h")
            .and_then(|p| p.get(&80)),
        Some(&8080)
    );
    assert_eq!(s.services[0].ports.get(&443), Some(&8443));
    assert_eq!(s.endpoints(&s.services[0], 80)[0].target_port, 8080);
    let e = load_err("services:\n- {name: s, hostname: h, ports: {\"http\": 80}}\n");
    assert!(
        e.contains("services[0].ports: \"http\" is not a port number"),
        "{e}"
    );
    let e = load_err("services:\n- {name: s, hostname: h, ports: {70000: 80}}\n");
    assert!(e.contains("70000 is not a port number"), "{e}");
}
