//! Specifications of the loader's L7 rules: per-resource rejection naming resource and field
//! while the rest of the file applies, duplicates and conflicts, gateway binding, delegation,
//! TCP/TLS routes, and the `/config_dump` form.

use super::tests::{destinations, load, load_scenario, scenario, subset_for, Req, DEMOAPP};
use super::*;
use crate::l7::route::StrMatch;
use crate::snapshot::Snapshot;

fn rejected_of(s: &Snapshot) -> Vec<String> {
    s.rejected.iter().map(ToString::to_string).collect()
}

const GOOD_VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: good}\nspec:\n  hosts: [good]\n  http: [{route: [{destination: {host: good}}]}]\n";

#[test]
fn bad_regex_is_rejected_and_the_rest_applies() {
    let s = load(&format!(
        "{GOOD_VS}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bad, namespace: shop}}\nspec:\n  hosts: [cart]\n  http:\n  - match: [{{uri: {{prefix: /ok}}}}, {{uri: {{regex: \"/items/(\"}}}}]\n    route: [{{destination: {{host: cart}}}}]\n---\nworkloads:\n- {{name: w, workloadIps: [\"10.0.0.1\"]}}\n"
    ));
    let e = rejected_of(&s);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("test.yaml: document 2 (VirtualService shop/bad): spec.http[0].match[1].uri.regex: invalid regex \"/items/(\""),
        "{}", e[0]
    );
    assert!(s
        .l7
        .routes
        .mesh("cart.shop.svc.cluster.local", "default")
        .is_none());
    assert!(s
        .l7
        .routes
        .mesh("good.default.svc.cluster.local", "default")
        .is_some());
    assert_eq!(
        s.workloads.len(),
        1,
        "L4 resources of the same file still apply"
    );
}

#[test]
fn bad_weights_are_rejected() {
    let vs = |weights: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: w}}\nspec:\n  hosts: [w]\n  http:\n  - route:\n{weights}")
    };
    let s = load(&vs(
        "    - {destination: {host: a}, weight: 90}\n    - {destination: {host: b}, weight: 20}\n",
    ));
    assert_eq!(
        rejected_of(&s),
        ["test.yaml: document 1 (VirtualService default/w): spec.http[0].route: destination weights sum to 110 (90 + 20); they must sum to 100"]
    );
    let s = load(&vs(
        "    - {destination: {host: a}}\n    - {destination: {host: b}}\n",
    ));
    assert!(rejected_of(&s)[0].contains("sum to 0 (0 + 0)"));
    let s = load(&vs(
        "    - {destination: {host: a}, weight: 100}\n    - {destination: {host: b}, weight: 0}\n",
    ));
    assert!(
        s.rejected.is_empty(),
        "a zero-weight destination is allowed"
    );
    let s = load(&vs("    - {destination: {host: a}, weight: 30}\n"));
    assert!(
        s.rejected.is_empty(),
        "a lone destination takes all traffic, as in Istio"
    );
    let s = load(&vs("    - {destination: {host: a}, weight: -10}\n"));
    assert!(
        rejected_of(&s)[0]
            .contains("spec.http[0].route[0].weight: invalid type: integer `-10`, expected u32"),
        "{:?}",
        s.rejected
    );
}

#[test]
fn unknown_subsets_are_rejected() {
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: demoapp}\nspec:\n  host: demoapp\n  subsets: [{name: v10, labels: {version: v1.0}}]\n";
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: demoapp}\nspec:\n  hosts: [demoapp]\n  http: [{route: [{destination: {host: demoapp, subset: v12}}]}]\n";
    let s = load(&format!("{vs}---\n{dr}"));
    assert_eq!(
        rejected_of(&s),
        ["test.yaml: document 1 (VirtualService default/demoapp): spec.http[0].route[0].destination.subset: subset \"v12\" is not defined by DestinationRule default/demoapp for host demoapp.default.svc.cluster.local (subsets: v10)"]
    );
    assert!(
        s.l7.destination_rule(DEMOAPP, "default").is_some(),
        "the rule itself applies"
    );
    let bad_dr = dr.replace(
        "subsets:",
        "trafficPolicy: {loadBalancer: {simple: FASTEST}}\n  subsets:",
    );
    let s = load(&format!("{}---\n{bad_dr}", vs.replace("v12", "v10")));
    let e = rejected_of(&s);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].contains("(DestinationRule default/demoapp): spec.trafficPolicy.loadBalancer.simple: unknown variant `FASTEST`"), "{}", e[0]);
    assert!(e[1].ends_with("no DestinationRule for host demoapp.default.svc.cluster.local (DestinationRule default/demoapp was rejected)"), "{}", e[1]);
}

#[test]
fn parse_errors_name_the_field_and_absolute_line() {
    let s = load(&format!("{GOOD_VS}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: typo}}\nspec:\n  hosts: [x]\n  http:\n  - route: [{{destination: {{host: x}}}}]\n    timeout: 10\n    retries: {{attemps: 3}}\n"));
    let e = rejected_of(&s);
    assert!(e[0].starts_with("test.yaml: document 2 (VirtualService default/typo): spec.http[0].timeout: 10 has no unit"), "{}", e[0]);
    assert!(
        e[0].contains("line 15"),
        "line counted from the start of the file: {}",
        e[0]
    );
    let s = load("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: t}\nspec:\n  hosts: [x]\n  http: [{route: [{destination: {host: x}}], retries: {attemps: 3}}]\n");
    assert!(
        rejected_of(&s)[0]
            .contains("spec.http[0].retries: unknown field `attemps`, expected one of `attempts`"),
        "{:?}",
        s.rejected
    );
    let s = load("apiVersion: networking.istio.io/v1alpha1\nkind: DestinationRule\nmetadata: {name: t}\nspec: {host: x}\n");
    assert!(
        rejected_of(&s)[0].contains("(DestinationRule default/t): apiVersion: unsupported version")
    );
    let s = load("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {namespace: x}\nspec: {hosts: [a.com]}\n");
    assert_eq!(
        rejected_of(&s),
        ["test.yaml: document 1 (ServiceEntry): metadata.name: missing"]
    );
}

#[test]
fn duplicates_are_rejected() {
    let s = load(&format!("{GOOD_VS}---\n{GOOD_VS}"));
    assert_eq!(rejected_of(&s), ["test.yaml: document 2 (VirtualService default/good): metadata.name: VirtualService default/good is already defined (document 1)"]);
    let dr = |name: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}}}\nspec: {{host: demoapp.default.svc.cluster.local}}\n---\n")
    };
    let s = load(&(dr("one") + &dr("two")));
    assert!(rejected_of(&s)[0].contains("(DestinationRule default/two): spec.host: host demoapp.default.svc.cluster.local already has DestinationRule default/one"));
}

#[test]
fn a_bad_authorization_policy_is_rejected_alone_beside_routes() {
    let s = load(&format!("{GOOD_VS}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec: {{action: AUDIT}}\n"));
    let e = s.rejected[0].to_string();
    assert!(
        e.contains("(AuthorizationPolicy default/p): spec.action"),
        "{e}"
    );
    assert!(s
        .l7
        .routes
        .mesh("good.default.svc.cluster.local", "default")
        .is_some());
    // Fail closed in its place.
    assert_eq!(s.authorizations[0].action, crate::model::PolicyAction::Deny);
}

#[test]
fn second_virtual_service_for_a_host_is_ignored_for_it() {
    let s = load(&format!(
        "{GOOD_VS}---\n{}",
        GOOD_VS
            .replace("name: good}", "name: later}")
            .replace("hosts: [good]", "hosts: [good, other]")
    ));
    assert!(s.rejected.is_empty());
    assert_eq!(
        s.l7.routes
            .mesh("good.default.svc.cluster.local", "default")
            .map(|t| t.virtual_service.as_str()),
        Some("default/good")
    );
    assert_eq!(
        s.l7.routes
            .mesh("other.default.svc.cluster.local", "default")
            .map(|t| t.virtual_service.as_str()),
        Some("default/later")
    );
    assert_eq!(s.l7.warnings.len(), 1);
    assert!(s.l7.warnings[0].contains("host good.default.svc.cluster.local on gateway mesh is already routed by VirtualService default/good"));
}

#[test]
fn mesh_bound_star_host_is_rejected() {
    let s = load("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: all}\nspec:\n  hosts: [\"*\"]\n  http: [{route: [{destination: {host: a}}]}]\n");
    assert!(rejected_of(&s)[0].contains(
        "spec.hosts[0]: \"*\" is not allowed for a VirtualService bound to the mesh gateway"
    ));
}

#[test]
fn match_gateways_select_blocks_per_gateway() {
    let s = load(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: split, namespace: web}
spec:
  hosts: [site.example.com]
  gateways: [mesh, public]
  http:
  - match: [{uri: {prefix: /internal}, gateways: [mesh]}]
    route: [{destination: {host: internal}}]
  - match: [{uri: {prefix: /}, gateways: [web/public]}]
    route: [{destination: {host: public}}]
"#,
    );
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    let mesh =
        s.l7.routes
            .mesh("site.example.com", "default")
            .expect("mesh table");
    assert_eq!(mesh.http.len(), 1);
    assert!(mesh.match_http(&Req::get("/").info()).is_none());
    let public =
        s.l7.routes
            .get("web/public", "site.example.com", "default")
            .expect("gateway table");
    assert_eq!(public.http.len(), 1);
    let m = public
        .match_http(&Req::get("/internal").info())
        .expect("public route");
    assert_eq!(destinations(&m)[0].0, "public.web.svc.cluster.local");
}

#[test]
fn delegate_routes_merge_with_their_root() {
    let s = load(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root}
spec:
  hosts: [demoapp]
  http:
  - name: reviews
    match: [{uri: {prefix: /reviews}}]
    delegate: {name: reviews, namespace: team}
    timeout: 3s
  - name: missing
    match: [{uri: {prefix: /ghost}}]
    delegate: {name: ghost}
  - route: [{destination: {host: demoapp}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: team}
spec:
  http:
  - name: v2
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews-v2}}]
  - route: [{destination: {host: reviews-v1}}]
    timeout: 1s
"#,
    );
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    assert_eq!(s.l7.warnings.len(), 1, "{:?}", s.l7.warnings);
    assert!(s.l7.warnings[0]
        .contains("spec.http[1].delegate: VirtualService default/ghost does not exist"));
    let table = s.l7.routes.mesh(DEMOAPP, "default").expect("table");
    assert_eq!(table.http.len(), 3, "two delegate routes + the catch-all");
    let route = |req: Req| {
        table.match_http(&req.info()).map(|m| {
            (
                m.name(),
                destinations(&m)[0].0.clone(),
                m.route.timeout.map(|t| t.0.as_secs()),
            )
        })
    };
    assert_eq!(
        route(Req::get("/reviews/1").header("end-user", "jason")),
        Some((
            Some("reviews-v2".into()),
            "reviews-v2.team.svc.cluster.local".into(),
            Some(3)
        ))
    );
    assert_eq!(
        route(Req::get("/reviews/1")),
        Some((
            Some("reviews".into()),
            "reviews-v1.team.svc.cluster.local".into(),
            Some(1)
        ))
    );
    assert_eq!(
        route(Req::get("/other").header("end-user", "jason")).map(|r| r.1),
        Some(DEMOAPP.to_string()),
        "the root's match must hold too"
    );
    assert_eq!(
        route(Req::get("/ghost")).map(|r| r.1),
        Some(DEMOAPP.to_string()),
        "a missing delegate's route is skipped"
    );
}

#[test]
fn tcp_and_tls_routes() {
    let s = load(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db}
spec:
  hosts: [db]
  tcp:
  - match: [{port: 5432, destinationSubnets: [10.1.0.0/16]}]
    route:
    - {destination: {host: db-primary}, weight: 80}
    - {destination: {host: db-replica}, weight: 20}
  - route: [{destination: {host: db-any}}]
  tls:
  - match: [{sniHosts: ["*.db.example.com"], port: 443}]
    route: [{destination: {host: tls-db}}]
"#,
    );
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    let t =
        s.l7.routes
            .mesh("db.default.svc.cluster.local", "default")
            .expect("table");
    let labels = crate::model::Labels::new();
    let conn = |port, ip: &str, sni| L4Info {
        port,
        destination_ip: ip.parse().ok(),
        source_labels: &labels,
        source_namespace: "default",
        sni,
    };
    let r = t
        .match_tcp(&conn(5432, "10.1.2.3", None))
        .expect("tcp route");
    assert_eq!(
        r.destinations.iter().map(|d| d.weight).collect::<Vec<_>>(),
        [80, 20]
    );
    assert_eq!(
        t.match_tcp(&conn(5432, "10.2.0.1", None))
            .map(|r| r.destinations[0].destination.host.as_str()),
        Some("db-any.default.svc.cluster.local")
    );
    assert!(t
        .match_tls(&conn(443, "10.2.0.1", Some("eu.db.example.com")))
        .is_some());
    assert!(t
        .match_tls(&conn(443, "10.2.0.1", Some("db.example.com")))
        .is_none());
    assert!(t.match_tls(&conn(443, "10.2.0.1", None)).is_none());
}

#[test]
fn config_dump_shows_compiled_routes_and_rejections() {
    let mut yaml = std::fs::read_to_string(scenario("demoapp-canary.yaml")).expect("canary");
    yaml.push_str("\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: broken}\nspec: {hosts: [x], http: [{route: [{destination: {host: x}}], fault: {abort: {httpStatus: 999}}}]}\n");
    let s = load(&yaml);
    let json = serde_json::to_value(&s).expect("serialisable");
    let table = &json["l7"]["routes"]["gateways"]["mesh"][DEMOAPP][0];
    assert_eq!(table["virtualService"], "default/demoapp");
    assert_eq!(table["http"][0]["matches"][0]["uri"]["prefix"], "/canary");
    assert_eq!(table["http"][0]["rewrite"]["uri"], "/");
    assert_eq!(
        table["http"][0]["action"]["forward"][0]["destination"]["subset"],
        "v11"
    );
    assert_eq!(
        table["http"][1]["retries"]["attempts"], 2,
        "Istio's default retry policy is shown"
    );
    assert_eq!(
        json["l7"]["destinationRules"][DEMOAPP][0]["subsets"][1]["labels"]["version"],
        "v1.1"
    );
    assert_eq!(
        json["rejected"][0]["resource"],
        "VirtualService default/broken"
    );
    assert_eq!(
        json["rejected"][0]["field"],
        "spec.http[0].fault.abort.httpStatus"
    );
}

#[test]
fn effective_policy_comes_from_the_snapshot() {
    let s = load(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: demoapp}
spec:
  host: demoapp
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  subsets: [{name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: X-User}}}}]
"#,
    );
    assert_eq!(
        s.l7.effective_policy(DEMOAPP, "default", None, 80)
            .load_balancer,
        LbPolicy::LeastRequest
    );
    assert_eq!(
        s.l7.effective_policy(DEMOAPP, "default", Some("v1"), 80)
            .load_balancer,
        LbPolicy::ConsistentHash(destination_rule::HashKey::Header("x-user".into()))
    );
    assert_eq!(
        s.l7.effective_policy("other.example.com", "default", None, 80),
        EffectivePolicy::default()
    );
    assert_eq!(
        s.l7.subset_labels(DEMOAPP, "default", "v1")
            .map(|l| l["version"].as_str()),
        Some("v1")
    );
    let req = Req::get("/");
    assert!(subset_for(&load_scenario("demoapp-canary.yaml"), DEMOAPP, &req).is_some());
}

#[test]
fn uri_match_helpers() {
    assert!(StrMatch::Prefix("/a".into()).matches_ignore_case("/A/b"));
    assert!(!StrMatch::Prefix("/ab".into()).matches_ignore_case("/a"));
    assert!(StrMatch::Present.matches(""));
}

#[test]
fn accepted_but_unapplied_destination_rule_fields_are_warned_about() {
    let s = load(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: demoapp}
spec:
  host: demoapp
  workloadSelector: {matchLabels: {app: client}}
  trafficPolicy:
    loadBalancer: {simple: RANDOM, localityLbSetting: {enabled: true}}
    connectionPool: {tcp: {maxConnections: 10, tcpKeepalive: {time: 7200s}}}
    tls: {mode: SIMPLE}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {connectionPool: {http: {maxConcurrentStreams: 5}}}
"#,
    );
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    assert_eq!(
        s.l7.effective_policy(DEMOAPP, "default", None, 80)
            .load_balancer,
        LbPolicy::Random,
        "the rest of the rule applies"
    );
    let w = s.l7.warnings.join("\n");
    for field in [
        "spec.workloadSelector",
        "spec.trafficPolicy.loadBalancer.localityLbSetting",
        "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
        "spec.trafficPolicy.tls (TLS origination)",
        "spec.subsets[0].trafficPolicy.connectionPool.http.maxConcurrentStreams",
    ] {
        assert!(
            w.contains(&format!(
                "DestinationRule default/demoapp: {field} is accepted but not applied"
            )),
            "no warning for {field}:\n{w}"
        );
    }
    let plain = load(&scenario_text("demoapp-canary.yaml"));
    assert!(
        plain.l7.warnings.is_empty(),
        "the users' scenario uses only applied fields: {:?}",
        plain.l7.warnings
    );
}

fn scenario_text(name: &str) -> String {
    std::fs::read_to_string(scenario(name)).expect("scenario")
}
