//! Specifications of L7 authorization: the policies scenario's L7 policy enforced on method and
//! path, DENY before ALLOW, `*` patterns on hosts and paths, `when` on request headers,
//! principals and namespaces from the peer identity, absent attributes, and L4 scoping.

use super::*;
use crate::l7::tests::load;
use std::path::Path;

fn policy(yaml: &str) -> L7Policy {
    let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str(yaml).expect("policy spec");
    compile_policy(&spec, "p", "default").expect("compiles")
}

struct R {
    method: &'static str,
    host: &'static str,
    path: &'static str,
    headers: HeaderMap,
    source: Option<Identity>,
    ip: Option<IpAddr>,
    port: u16,
}

fn req(method: &'static str, path: &'static str) -> R {
    R {
        method,
        host: "productpage.default.svc.cluster.local",
        path,
        headers: HeaderMap::new(),
        source: Some(Identity::new("cluster.local", "default", "proxy")),
        ip: "10.0.1.1".parse().ok(),
        port: 9080,
    }
}

impl R {
    fn check(&self, policies: &[&L7Policy]) -> Result<(), Denied> {
        let r = AuthzRequest {
            method: self.method,
            host: self.host,
            path: self.path,
            headers: &self.headers,
            source: self.source.as_ref(),
            source_ip: self.ip,
            destination_ip: "10.0.0.9".parse().ok(),
            destination_port: self.port,
        };
        authorize(policies.iter().copied(), &r)
    }
    fn header(mut self, k: &'static str, v: &'static str) -> Self {
        self.headers.append(k, http::HeaderValue::from_static(v));
        self
    }
}

#[test]
fn scenario_get_only_policy_admits_get_on_listed_paths() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/scenarios/policies.yaml");
    let yaml = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("scenario {} is missing: {e}", path.display()));
    let s = load(&format!("{yaml}\n---\nworkloads:\n- {{name: pp, namespace: default, labels: {{app: productpage}}, workloadIps: [\"10.0.0.9\"]}}\n"));
    let dst = s
        .workloads
        .iter()
        .find(|w| w.name == "pp")
        .expect("workload");
    let applicable = s.l7.policies_for(&s, dst);
    let names: Vec<&str> = applicable.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["deny-9999", "productpage-get-only"],
        "L4 scoping: namespace-wide and selector policies"
    );
    assert!(req("GET", "/productpage").check(&applicable).is_ok());
    assert!(req("GET", "/static/css/app.css").check(&applicable).is_ok());
    assert!(
        req("GET", "/productpage?u=1").check(&applicable).is_ok(),
        "the query is not part of the path"
    );
    let e = req("POST", "/productpage")
        .check(&applicable)
        .expect_err("POST denied");
    assert_eq!(e.to_string(), "no ALLOW policy matched (1 apply)");
    assert!(req("GET", "/api/v1").check(&applicable).is_err());
    let mut r = req("GET", "/productpage");
    r.port = 9999;
    assert_eq!(
        r.check(&applicable).expect_err("deny").policy.as_deref(),
        Some("default/deny-9999")
    );
}

#[test]
fn deny_is_decided_before_allow() {
    let allow_all = policy("rules: [{}]");
    let deny_admin = policy("action: DENY\nrules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]");
    assert!(req("GET", "/").check(&[&allow_all, &deny_admin]).is_ok());
    let e = req("GET", "/admin/users")
        .check(&[&allow_all, &deny_admin])
        .expect_err("denied");
    assert_eq!(e.policy.as_deref(), Some("default/p"));
    assert!(req("GET", "/").check(&[]).is_ok(), "no policy: allowed");
    assert!(
        req("GET", "/").check(&[&policy("{}")]).is_err(),
        "ALLOW without rules admits nothing"
    );
}

#[test]
fn hosts_match_case_insensitively_with_wildcards() {
    let p = policy("rules: [{to: [{operation: {hosts: [\"*.svc.cluster.local\", \"Example.COM\"], notHosts: [\"secret.*\"]}}]}]");
    assert!(req("GET", "/").check(&[&p]).is_ok());
    let mut r = req("GET", "/");
    r.host = "EXAMPLE.com";
    assert!(r.check(&[&p]).is_ok());
    r.host = "secret.svc.cluster.local";
    assert!(r.check(&[&p]).is_err());
    r.host = "example.org";
    assert!(r.check(&[&p]).is_err());
}

#[test]
fn methods_paths_and_ports_with_not_forms() {
    let p = policy("rules: [{to: [{operation: {methods: [GET, HEAD], notPaths: [\"*.secret\"], ports: [\"9080\", 9443]}}]}]");
    assert!(req("HEAD", "/a").check(&[&p]).is_ok());
    assert!(req("GET", "/a.secret").check(&[&p]).is_err());
    assert!(req("DELETE", "/a").check(&[&p]).is_err());
    let mut r = req("GET", "/a");
    r.port = 8080;
    assert!(r.check(&[&p]).is_err());
}

#[test]
fn operations_or_and_rule_parts_and() {
    let p = policy("rules: [{from: [{source: {namespaces: [default]}}], to: [{operation: {methods: [POST]}}, {operation: {paths: [/public]}}]}]");
    assert!(req("POST", "/x").check(&[&p]).is_ok());
    assert!(req("GET", "/public").check(&[&p]).is_ok());
    assert!(req("GET", "/x").check(&[&p]).is_err());
    let mut other = req("POST", "/x");
    other.source = Some(Identity::new("cluster.local", "other", "sa"));
    assert!(other.check(&[&p]).is_err(), "from must hold too");
}

#[test]
fn when_conditions_on_request_headers() {
    let p = policy("rules: [{when: [{key: \"request.headers[x-tenant]\", values: [\"acme-*\"]}, {key: \"request.headers[x-debug]\", notValues: [\"*\"]}]}]");
    assert!(req("GET", "/")
        .header("x-tenant", "acme-eu")
        .check(&[&p])
        .is_ok());
    assert!(req("GET", "/")
        .header("x-tenant", "other")
        .check(&[&p])
        .is_err());
    assert!(
        req("GET", "/").check(&[&p]).is_err(),
        "absent header: values cannot match"
    );
    assert!(req("GET", "/")
        .header("x-tenant", "acme-eu")
        .header("x-debug", "1")
        .check(&[&p])
        .is_err());
}

#[test]
fn sources_principals_namespaces_and_ip_blocks() {
    let p = policy("rules: [{from: [{source: {principals: [\"spiffe://cluster.local/ns/default/sa/proxy\"]}}, {source: {serviceAccounts: [ops/admin]}}, {source: {ipBlocks: [192.168.0.0/16], notIpBlocks: [192.168.9.9]}}]}]");
    assert!(req("GET", "/").check(&[&p]).is_ok());
    let mut r = req("GET", "/");
    r.source = Some(Identity::new("cluster.local", "ops", "admin"));
    assert!(r.check(&[&p]).is_ok(), "serviceAccounts: <ns>/<sa>");
    r.source = None;
    assert!(r.check(&[&p]).is_err(), "plaintext has no principal");
    r.ip = "192.168.1.1".parse().ok();
    assert!(r.check(&[&p]).is_ok());
    r.ip = "192.168.9.9".parse().ok();
    assert!(r.check(&[&p]).is_err());
}

#[test]
fn when_on_source_and_destination_attributes() {
    let p = policy("rules: [{when: [{key: source.namespace, values: [default]}, {key: source.principal, values: [\"*/sa/proxy\"]}, {key: destination.port, values: [\"9080\"]}, {key: remote.ip, values: [10.0.0.0/8]}, {key: destination.ip, notValues: [10.9.0.0/16]}]}]");
    assert!(req("GET", "/").check(&[&p]).is_ok());
    let mut r = req("GET", "/");
    r.ip = "11.0.0.1".parse().ok();
    assert!(r.check(&[&p]).is_err());
}

#[test]
fn attributes_without_a_source_are_absent() {
    let jwt = policy("rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]");
    assert!(
        req("GET", "/").check(&[&jwt]).is_err(),
        "no JWT: requestPrincipals never match (fail closed)"
    );
    let not_jwt = policy("action: DENY\nrules: [{when: [{key: \"request.auth.claims[group]\", notValues: [admin]}]}]");
    assert!(
        req("GET", "/").check(&[&not_jwt]).is_err(),
        "DENY with notValues on an absent claim denies"
    );
    assert_eq!(
        not_jwt.rules[0].when[0].key,
        ConditionKey::Absent("request.auth.claims[group]".into())
    );
}

#[test]
fn policies_serialise_for_config_dump() {
    let p = policy("rules: [{to: [{operation: {paths: [/a]}}], when: [{key: \"request.headers[X-A]\", values: [b]}]}]");
    let json = serde_json::to_value(&p).expect("serialisable");
    assert_eq!(json["rules"][0]["to"][0]["paths"][0], "/a");
    assert_eq!(json["rules"][0]["when"][0]["key"]["requestHeader"], "x-a");
}
