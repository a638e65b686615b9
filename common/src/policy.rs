//! L4 authorization with Istio semantics: which compiled `Authorization` policies apply to a
//! destination workload, how their rules match a connection (source principal, namespace and
//! IP, destination IP and port), and the decision (any matching DENY denies; otherwise, if any
//! ALLOW applies, one must match).

use crate::identity::Identity;
use crate::model::{
    AddressMatch, Authorization, PolicyAction, PolicyScope, Rule, RuleMatch, StringMatch,
    TypedStringMatch, Workload,
};
use crate::snapshot::{selector_matches, Snapshot};
use std::net::IpAddr;
use std::sync::Arc;

/// What the destination side knows about a connection when it authorizes it.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo<'a> {
    pub src_ip: IpAddr,
    /// The peer's verified identity; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    pub dst: &'a Workload,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// The peer is the destination's waypoint, which already enforced the L7 policies: those
    /// with L7 rules are not evaluated again here (they would fail closed at L4), the rest are.
    pub via_waypoint: bool,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Denied {
    /// `<ns>/<name>` of the DENY policy that matched, if one did.
    pub policy: Option<String>,
    pub reason: String,
}

/// Decides whether `conn` is allowed under the policies of `snapshot`.
pub fn authorize(snapshot: &Snapshot, conn: &ConnectionInfo) -> Result<(), Denied> {
    let applicable = applicable_policies(snapshot, conn.dst)
        .filter(|p| !(conn.via_waypoint && p.has_l7_rules))
        .map(|p| p.as_ref());
    decide(applicable, conn)
}

/// Decides `conn` under exactly `policies` (any matching DENY denies; otherwise, if any ALLOW
/// is among them, one must match).
pub fn decide<'p>(
    policies: impl IntoIterator<Item = &'p Authorization>,
    conn: &ConnectionInfo,
) -> Result<(), Denied> {
    let src = Source::new(conn);
    let applicable: Vec<&Authorization> = policies.into_iter().collect();
    if let Some(deny) = applicable
        .iter()
        .find(|p| p.action == PolicyAction::Deny && policy_matches(p, &src))
    {
        let key = format!("{}/{}", deny.namespace, deny.name);
        return Err(Denied {
            reason: format!("denied by DENY policy {key}"),
            policy: Some(key),
        });
    }
    let allows: Vec<&&Authorization> = applicable
        .iter()
        .filter(|p| p.action == PolicyAction::Allow)
        .collect();
    if allows.is_empty() || allows.iter().any(|p| policy_matches(p, &src)) {
        return Ok(());
    }
    Err(Denied {
        policy: None,
        reason: format!("no ALLOW policy matched ({} apply)", allows.len()),
    })
}

/// Policies that apply to `dst`: global ones (root namespace or `Global` scope), namespace ones
/// in its namespace, selector ones whose labels it carries (in its namespace, or in the root
/// namespace for any namespace), and those it names in `authorizationPolicies`. A
/// `WorkloadSelector` policy without selector labels applies only through that list, as in
/// Istio's ztunnel.
pub fn applicable_policies<'a>(
    snapshot: &'a Snapshot,
    dst: &'a Workload,
) -> impl Iterator<Item = &'a Arc<Authorization>> + 'a {
    let root = snapshot.root_namespace.as_str();
    snapshot.authorizations.iter().filter(move |p| {
        let named = dst
            .authorization_policies
            .iter()
            .any(|n| n.split_once('/') == Some((p.namespace.as_str(), p.name.as_str())));
        let ns_ok = p.namespace == dst.namespace || p.namespace == root;
        named
            || match p.scope {
                PolicyScope::Global => true,
                PolicyScope::Namespace => ns_ok,
                PolicyScope::WorkloadSelector => {
                    ns_ok && !p.selector.is_empty() && selector_matches(&p.selector, &dst.labels)
                }
            }
    })
}

/// The source attributes rules compare against, computed once per connection.
struct Source<'a> {
    conn: &'a ConnectionInfo<'a>,
    src_ip: IpAddr,
    dst_ip: IpAddr,
    principal: Option<String>,
}

impl<'a> Source<'a> {
    fn new(conn: &'a ConnectionInfo<'a>) -> Self {
        Source {
            conn,
            src_ip: conn.src_ip.to_canonical(),
            dst_ip: conn.dst_ip.to_canonical(),
            principal: conn.src_identity.map(Identity::principal),
        }
    }
}

fn policy_matches(p: &Authorization, src: &Source) -> bool {
    p.rules.iter().any(|r| rule_matches(r, src))
}

fn rule_matches(rule: &Rule, src: &Source) -> bool {
    rule.clauses
        .iter()
        .all(|c| c.matches.is_empty() || c.matches.iter().any(|m| match_matches(m, src)))
}

/// Positive lists must hit when non-empty; `not*` lists must not hit. Without a peer identity,
/// principal and namespace lists cannot hit.
fn match_matches(m: &RuleMatch, src: &Source) -> bool {
    let principal = src.principal.as_deref();
    let namespace = src.conn.src_identity.map(|i| i.namespace.as_str());
    let port = src.conn.dst_port;
    positive(&m.principals, |s| {
        principal.is_some_and(|p| principal_matches(s, p))
    }) && negative(&m.not_principals, |s| {
        principal.is_some_and(|p| principal_matches(s, p))
    }) && positive(&m.namespaces, |s| {
        namespace.is_some_and(|n| string_matches(s, n))
    }) && negative(&m.not_namespaces, |s| {
        namespace.is_some_and(|n| string_matches(s, n))
    }) && positive(&m.source_ips, |a| address_matches(a, src.src_ip))
        && negative(&m.not_source_ips, |a| address_matches(a, src.src_ip))
        && positive(&m.destination_ips, |a| address_matches(a, src.dst_ip))
        && negative(&m.not_destination_ips, |a| address_matches(a, src.dst_ip))
        && positive(&m.destination_ports, |p| *p == port)
        && negative(&m.not_destination_ports, |p| *p == port)
}

fn positive<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(hit)
}

fn negative<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
    !list.iter().any(hit)
}

/// Principals in policies may be written as `td/ns/x/sa/y` or `spiffe://td/ns/x/sa/y`.
fn principal_matches(m: &StringMatch, principal: &str) -> bool {
    match m {
        StringMatch::Plain(p) => plain_matches(p.strip_prefix("spiffe://").unwrap_or(p), principal),
        StringMatch::Typed(t) => {
            let strip = |s: &Option<String>| {
                s.as_ref()
                    .map(|s| s.strip_prefix("spiffe://").unwrap_or(s).to_string())
            };
            let t = TypedStringMatch {
                exact: strip(&t.exact),
                prefix: strip(&t.prefix),
                ..t.clone()
            };
            typed_matches(&t, principal)
        }
    }
}

/// Exact, `*`, `prefix*` or `*suffix` (plain form); exact/prefix/suffix/presence (typed form).
pub fn string_matches(m: &StringMatch, value: &str) -> bool {
    match m {
        StringMatch::Plain(p) => plain_matches(p, value),
        StringMatch::Typed(t) => typed_matches(t, value),
    }
}

fn plain_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

fn typed_matches(t: &TypedStringMatch, value: &str) -> bool {
    if let Some(e) = &t.exact {
        value == e
    } else if let Some(p) = &t.prefix {
        value.starts_with(p.as_str())
    } else if let Some(s) = &t.suffix {
        value.ends_with(s.as_str())
    } else {
        t.presence.is_some()
    }
}

/// Whether `ip` is inside `a`. A malformed prefix length matches nothing (the loader rejects it).
pub fn address_matches(a: &AddressMatch, ip: IpAddr) -> bool {
    match a {
        AddressMatch::Cidr(net) => net.contains(&ip),
        AddressMatch::Ip(addr) => addr.to_canonical() == ip,
        AddressMatch::Parts { address, length } => {
            ipnet::IpNet::new(*address, *length).is_ok_and(|n| n.contains(&ip))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn snap(yaml: &str) -> Snapshot {
        match load_str(yaml, "test.yaml") {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    const WORKLOADS: &str = r#"
workloads:
- {name: web, namespace: default, workloadIps: ["10.0.0.1"], labels: {app: web}}
- {name: db, namespace: data, workloadIps: ["10.0.0.2"], labels: {app: db}}
- {name: proxy, namespace: default, serviceAccount: proxy, workloadIps: ["10.0.1.1"]}
"#;

    fn check(
        s: &Snapshot,
        dst: &str,
        src_id: Option<&str>,
        src_ip: &str,
        port: u16,
    ) -> Result<(), Denied> {
        let dst = s
            .workloads
            .iter()
            .find(|w| w.name == dst)
            .expect("dst exists");
        let id = src_id.map(|i| Identity::parse(i).expect("valid identity"));
        let conn = ConnectionInfo {
            src_ip: src_ip.parse().expect("ip"),
            src_identity: id.as_ref(),
            dst,
            dst_ip: dst.workload_ips[0],
            dst_port: port,
            via_waypoint: false,
        };
        authorize(s, &conn)
    }

    const PROXY: Option<&str> = Some("cluster.local/ns/default/sa/proxy");
    const OTHER: Option<&str> = Some("cluster.local/ns/other/sa/default");

    #[test]
    fn no_policy_allows() {
        let s = snap(WORKLOADS);
        assert!(check(&s, "web", None, "10.1.1.1", 80).is_ok());
    }

    #[test]
    fn allow_on_principal_admits_only_that_principal() {
        let s = snap(&format!(
            "{WORKLOADS}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: web-from-proxy, namespace: default}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/default/sa/proxy]}}}}]
"
        ));
        assert!(check(&s, "web", PROXY, "10.0.1.1", 80).is_ok());
        let e = check(&s, "web", OTHER, "10.0.1.1", 80).unwrap_err();
        assert_eq!(e.to_string(), "no ALLOW policy matched (1 apply)");
        assert_eq!(e.policy, None);
        assert!(
            check(&s, "web", None, "10.0.1.1", 80).is_err(),
            "plaintext has no principal"
        );
        assert!(
            check(&s, "db", OTHER, "10.0.1.1", 80).is_ok(),
            "selector does not cover db"
        );
    }

    #[test]
    fn spiffe_form_and_patterns() {
        let s = snap(&format!(
            "{WORKLOADS}policies:
- name: p
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - clauses:
    - matches:
      - principals: [\"spiffe://cluster.local/ns/default/sa/proxy\"]
      - principals: [\"*/sa/admin\"]
      - principals: [{{prefix: \"spiffe://cluster.local/ns/ops/\"}}]
"
        ));
        assert!(check(&s, "web", PROXY, "1.1.1.1", 80).is_ok());
        assert!(check(&s, "web", Some("example.org/ns/x/sa/admin"), "1.1.1.1", 80).is_ok());
        assert!(check(
            &s,
            "web",
            Some("cluster.local/ns/ops/sa/any"),
            "1.1.1.1",
            80
        )
        .is_ok());
        assert!(check(&s, "web", OTHER, "1.1.1.1", 80).is_err());
    }

    #[test]
    fn deny_before_allow() {
        let s = snap(&format!(
            "{WORKLOADS}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-all, namespace: default}}
spec: {{rules: [{{}}]}}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: deny-9999, namespace: default}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{ports: [\"9999\"]}}}}]}}]
"
        ));
        assert!(check(&s, "web", None, "1.1.1.1", 80).is_ok());
        let e = check(&s, "web", PROXY, "1.1.1.1", 9999).unwrap_err();
        assert_eq!(e.policy.as_deref(), Some("default/deny-9999"));
        assert_eq!(e.to_string(), "denied by DENY policy default/deny-9999");
        assert!(
            check(&s, "db", None, "1.1.1.1", 9999).is_ok(),
            "namespace scope"
        );
    }

    #[test]
    fn global_scope_from_root_namespace() {
        let s = snap(&format!(
            "{WORKLOADS}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: mesh-deny, namespace: istio-system}}
spec:
  action: DENY
  rules: [{{from: [{{source: {{notNamespaces: [default]}}}}]}}]
"
        ));
        assert_eq!(s.authorizations[0].scope, PolicyScope::Global);
        assert!(check(&s, "db", PROXY, "1.1.1.1", 80).is_ok());
        assert!(check(&s, "db", OTHER, "1.1.1.1", 80).is_err());
        assert!(check(&s, "web", OTHER, "1.1.1.1", 80).is_err());
        // A plaintext source has no namespace, so `notNamespaces` does not exclude it: denied.
        assert!(check(&s, "web", None, "1.1.1.1", 80).is_err());
    }

    #[test]
    fn root_namespace_selector_applies_across_namespaces() {
        let s = snap(&format!(
            "{WORKLOADS}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: db-deny, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{app: db}}}}
  action: DENY
  rules: [{{}}]
"
        ));
        assert!(check(&s, "db", PROXY, "1.1.1.1", 80).is_err());
        assert!(check(&s, "web", PROXY, "1.1.1.1", 80).is_ok());
    }

    #[test]
    fn namespaces_ip_blocks_and_ports() {
        let s = snap(&format!(
            "{WORKLOADS}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: db-allow, namespace: data}}
spec:
  rules:
  - from: [{{source: {{namespaces: [default]}}}}, {{source: {{ipBlocks: [192.168.0.0/16], notIpBlocks: [192.168.9.9]}}}}]
    to: [{{operation: {{ports: [\"5432\"]}}}}]
"
        ));
        assert!(check(&s, "db", PROXY, "10.9.9.9", 5432).is_ok());
        assert!(check(&s, "db", PROXY, "10.9.9.9", 5433).is_err());
        assert!(check(&s, "db", None, "192.168.1.2", 5432).is_ok());
        assert!(check(&s, "db", None, "::ffff:192.168.1.2", 5432).is_ok());
        assert!(check(&s, "db", None, "192.168.9.9", 5432).is_err());
        assert!(check(&s, "db", OTHER, "10.9.9.9", 5432).is_err());
    }

    #[test]
    fn when_conditions_are_clauses() {
        let s = snap(&format!(
            "{WORKLOADS}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: w, namespace: default}}
spec:
  rules:
  - when:
    - {{key: source.ip, values: [10.0.0.0/8]}}
    - {{key: destination.port, notValues: [\"22\"]}}
    - {{key: source.principal, values: [\"*\"]}}
"
        ));
        assert!(check(&s, "web", PROXY, "10.1.1.1", 80).is_ok());
        assert!(check(&s, "web", PROXY, "10.1.1.1", 22).is_err());
        assert!(check(&s, "web", PROXY, "11.1.1.1", 80).is_err());
        assert!(check(&s, "web", None, "10.1.1.1", 80).is_err());
    }

    #[test]
    fn empty_spec_allows_nothing_and_empty_rule_matches_all() {
        let s = snap(&format!(
            "{WORKLOADS}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-all, namespace: data}}
spec: {{}}
"
        ));
        assert_eq!(
            check(&s, "db", PROXY, "1.1.1.1", 80)
                .unwrap_err()
                .to_string(),
            "no ALLOW policy matched (1 apply)"
        );
        assert!(check(&s, "web", PROXY, "1.1.1.1", 80).is_ok());
        let s = snap(&format!(
            "{WORKLOADS}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-all, namespace: data}}
spec: {{rules: [{{}}]}}
"
        ));
        assert!(check(&s, "db", None, "1.1.1.1", 80).is_ok());
    }

    #[test]
    fn l7_fields_fail_closed() {
        let s = snap(&format!(
            "{WORKLOADS}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: get-only, namespace: default}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - to: [{{operation: {{methods: [GET], ports: [\"80\"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: data}}
spec:
  action: DENY
  rules:
  - to: [{{operation: {{paths: [/admin], ports: [\"8080\"]}}}}]
  - when: [{{key: \"request.headers[x-bad]\", values: [\"1\"]}}]
    from: [{{source: {{namespaces: [other]}}}}]
"
        ));
        assert!(s.authorizations.iter().all(|a| a.has_l7_rules));
        // ALLOW rule with L7 fields is dropped: the policy admits nothing.
        assert!(s.authorizations[0].rules.is_empty());
        assert!(check(&s, "web", PROXY, "1.1.1.1", 80).is_err());
        // DENY: L7 parts dropped, the rest still applies (broader).
        assert!(check(&s, "db", PROXY, "1.1.1.1", 8080).is_err());
        assert!(check(&s, "db", PROXY, "1.1.1.1", 80).is_ok());
        assert!(check(&s, "db", OTHER, "1.1.1.1", 80).is_err());
    }

    #[test]
    fn workload_named_policies_and_selectorless_workload_scope() {
        let s = snap(
            r#"
workloads:
- {name: web, namespace: default, workloadIps: ["10.0.0.1"], authorizationPolicies: [default/only-proxy]}
- {name: web2, namespace: default, workloadIps: ["10.0.0.3"]}
policies:
- name: only-proxy
  namespace: default
  scope: WorkloadSelector
  action: Allow
  rules: [{clauses: [{matches: [{principals: ["cluster.local/ns/default/sa/proxy"]}]}]}]
"#,
        );
        assert!(check(&s, "web", PROXY, "1.1.1.1", 80).is_ok());
        assert!(check(&s, "web", OTHER, "1.1.1.1", 80).is_err());
        assert!(
            check(&s, "web2", OTHER, "1.1.1.1", 80).is_ok(),
            "bound only through authorizationPolicies"
        );
    }

    #[test]
    fn string_and_address_matching() {
        let plain = |s: &str| StringMatch::Plain(s.into());
        assert!(string_matches(&plain("*"), "x"));
        assert!(string_matches(&plain("ab*"), "abc"));
        assert!(string_matches(&plain("*bc"), "abc"));
        assert!(!string_matches(&plain("abc"), "abcd"));
        let typed = |json: &str| StringMatch::Typed(serde_json::from_str(json).expect("typed"));
        assert!(string_matches(&typed(r#"{"exact":"a"}"#), "a"));
        assert!(string_matches(&typed(r#"{"suffix":"z"}"#), "xyz"));
        assert!(string_matches(&typed(r#"{"presence":{}}"#), "anything"));
        let ip: IpAddr = "10.1.2.3".parse().expect("ip");
        assert!(address_matches(
            &AddressMatch::Parts {
                address: "10.0.0.0".parse().expect("ip"),
                length: 8
            },
            ip
        ));
        assert!(!address_matches(
            &AddressMatch::Parts {
                address: "10.0.0.0".parse().expect("ip"),
                length: 99
            },
            ip
        ));
        assert!(address_matches(&AddressMatch::Ip(ip), ip));
    }

    #[test]
    fn l7_policies_are_skipped_for_traffic_from_the_waypoint() {
        let s = crate::config::load_str(
            r#"
workloads:
- {uid: p, name: p, namespace: default, workloadIps: [10.0.0.5], labels: {app: productpage}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  action: ALLOW
  rules:
  - to:
    - operation: {methods: ["GET"]}
"#,
            "t.yaml",
        )
        .unwrap();
        let dst = &s.workloads[0];
        let wp = Identity::parse("cluster.local/ns/default/sa/waypoint").unwrap();
        let mut conn = ConnectionInfo {
            src_ip: "10.0.0.9".parse().unwrap(),
            src_identity: Some(&wp),
            dst,
            dst_ip: dst.workload_ips[0],
            dst_port: 9080,
            via_waypoint: false,
        };
        // At L4 an ALLOW rule with L7 fields matches nothing: fail closed...
        assert!(authorize(&s, &conn).is_err());
        // ...unless the waypoint already enforced it.
        conn.via_waypoint = true;
        assert!(authorize(&s, &conn).is_ok());
    }
}
