//! Specifications of the L7 model end to end through the loader: the shared scenario files load
//! unchanged and route as users observed on Istio, each match kind, host resolution, gateway
//! binding and request helpers shared with the other L7 test files.

use super::route::RouteAction;
use super::select::pick_weighted;
use super::*;
use crate::config::{load_file, load_str};
use crate::snapshot::Snapshot;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// An owned request to build [`RequestInfo`]s from.
pub(crate) struct Req {
    pub method: String,
    pub scheme: String,
    pub authority: String,
    pub path: String,
    pub headers: HeaderMap,
    pub port: u16,
    pub labels: crate::model::Labels,
    pub namespace: String,
    pub ip: Option<IpAddr>,
}

impl Req {
    pub fn get(path: &str) -> Self {
        Req {
            method: "GET".into(),
            scheme: "http".into(),
            authority: "demoapp:8080".into(),
            path: path.into(),
            headers: HeaderMap::new(),
            port: 8080,
            labels: crate::model::Labels::new(),
            namespace: "default".into(),
            ip: None,
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        let name = HeaderName::from_bytes(k.as_bytes()).expect("header name");
        self.headers
            .append(name, HeaderValue::from_str(v).expect("header value"));
        self
    }
    pub fn method(mut self, m: &str) -> Self {
        self.method = m.into();
        self
    }
    pub fn scheme(mut self, s: &str) -> Self {
        self.scheme = s.into();
        self
    }
    pub fn authority(mut self, a: &str) -> Self {
        self.authority = a.into();
        self
    }
    pub fn port(mut self, p: u16) -> Self {
        self.port = p;
        self
    }
    pub fn from(mut self, ns: &str, labels: &[(&str, &str)]) -> Self {
        self.namespace = ns.into();
        self.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self
    }
    pub fn ip(mut self, ip: &str) -> Self {
        self.ip = Some(ip.parse().expect("ip"));
        self
    }
    pub fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            method: &self.method,
            scheme: &self.scheme,
            authority: &self.authority,
            path: &self.path,
            headers: &self.headers,
            port: self.port,
            source_labels: &self.labels,
            source_namespace: &self.namespace,
            source_ip: self.ip,
        }
    }
}

pub(crate) fn scenario(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/scenarios");
    assert!(
        dir.is_dir(),
        "scenario directory {} is missing (expected the shared/ checkout beside the repository)",
        dir.display()
    );
    dir.join(name)
}

pub(crate) fn load_scenario(name: &str) -> Snapshot {
    match load_file(&scenario(name)) {
        Ok(s) => s,
        Err(e) => panic!("scenario {name} must load unchanged: {e}"),
    }
}

pub(crate) fn load(yaml: &str) -> Snapshot {
    load_str(yaml, "test.yaml").unwrap_or_else(|e| panic!("unexpected error: {e}"))
}

pub(crate) const DEMOAPP: &str = "demoapp.default.svc.cluster.local";

/// `(host, subset, weight)` of a forwarding route.
pub(crate) fn destinations(m: &HttpMatch) -> Vec<(String, Option<String>, u32)> {
    match &m.route.action {
        RouteAction::Forward(d) => d
            .iter()
            .map(|d| {
                (
                    d.destination.host.clone(),
                    d.destination.subset.clone(),
                    d.weight,
                )
            })
            .collect(),
        other => panic!("expected a forwarding route, got {other:?}"),
    }
}

pub(crate) fn subset_for(s: &Snapshot, host: &str, req: &Req) -> Option<String> {
    let table =
        s.l7.routes
            .mesh(host, "default")
            .expect("a table for the host");
    let m = table.match_http(&req.info())?;
    destinations(&m)[0].1.clone()
}

#[test]
fn canary_scenario_loads_unchanged() {
    let s = load_scenario("demoapp-canary.yaml");
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    assert!(
        s.other_resources.is_empty(),
        "VirtualService and DestinationRule are typed now"
    );
    let dr =
        s.l7.destination_rule(DEMOAPP, "default")
            .expect("DestinationRule for demoapp");
    let subsets: Vec<(&str, &str)> = dr
        .subsets
        .iter()
        .map(|s| (s.name.as_str(), s.labels["version"].as_str()))
        .collect();
    assert_eq!(subsets, [("v10", "v1.0"), ("v11", "v1.1")]);
    let table =
        s.l7.routes
            .mesh(DEMOAPP, "default")
            .expect("routes for demoapp");
    assert_eq!(table.virtual_service, "default/demoapp");
    assert_eq!(table.http.len(), 2);
}

#[test]
fn canary_prefix_rewrites_to_v11() {
    let s = load_scenario("demoapp-canary.yaml");
    let table = s.l7.routes.mesh(DEMOAPP, "default").expect("table");
    for (path, rewritten) in [
        ("/canary", "/"),
        ("/canary/x", "/x"),
        ("/canary?a=1", "/?a=1"),
        ("/canary/a/b?q", "/a/b?q"),
    ] {
        let req = Req::get(path);
        let m = table.match_http(&req.info()).expect("canary route");
        assert_eq!(m.name().as_deref(), Some("canary"));
        assert_eq!(
            destinations(&m),
            [(DEMOAPP.to_string(), Some("v11".to_string()), 100)]
        );
        assert_eq!(m.rewritten_path(path).as_deref(), Some(rewritten), "{path}");
    }
}

#[test]
fn everything_else_goes_to_v10_unchanged() {
    let s = load_scenario("demoapp-canary.yaml");
    let table = s.l7.routes.mesh(DEMOAPP, "default").expect("table");
    for path in ["/", "/index.html", "/can", "/Canary"] {
        let req = Req::get(path);
        let m = table.match_http(&req.info()).expect("default route");
        assert_eq!(m.name().as_deref(), Some("default"), "{path}");
        assert_eq!(destinations(&m)[0].1.as_deref(), Some("v10"));
        assert_eq!(m.rewritten_path(path), None);
    }
}

/// The weights scenario has no DestinationRule of its own: users apply it on top of the canary
/// scenario, whose rule defines the subsets.
fn weights_with_canary_rule() -> Snapshot {
    let canary = std::fs::read_to_string(scenario("demoapp-canary.yaml")).expect("canary scenario");
    let rule = canary
        .split("---")
        .nth(1)
        .expect("DestinationRule document")
        .to_string();
    let weights =
        std::fs::read_to_string(scenario("demoapp-weights.yaml")).expect("weights scenario");
    load(&format!("{weights}\n---{rule}"))
}

#[test]
fn weights_scenario_splits_90_10() {
    let s = weights_with_canary_rule();
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    let table = s.l7.routes.mesh(DEMOAPP, "default").expect("table");
    let req = Req::get("/");
    let m = table.match_http(&req.info()).expect("route");
    assert_eq!(
        destinations(&m),
        [
            (DEMOAPP.to_string(), Some("v10".to_string()), 90),
            (DEMOAPP.to_string(), Some("v11".to_string()), 10)
        ]
    );
    let RouteAction::Forward(dests) = &m.route.action else {
        panic!("forward")
    };
    let mut v11 = 0;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..10_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if pick_weighted(dests, x).and_then(|d| d.destination.subset.as_deref()) == Some("v11") {
            v11 += 1;
        }
    }
    assert!(
        (800..1200).contains(&v11),
        "about 10% to v11, got {v11}/10000"
    );
}

#[test]
fn weights_scenario_alone_loads_but_its_subsets_need_a_rule() {
    let s = load_scenario("demoapp-weights.yaml");
    assert!(s.l7.routes.mesh(DEMOAPP, "default").is_none());
    assert_eq!(s.rejected.len(), 1);
    let e = s.rejected[0].to_string();
    assert!(
        e.ends_with("demoapp-weights.yaml: document 1 (VirtualService default/demoapp): spec.http[0].route[0].destination.subset: subset \"v10\" is not defined: no DestinationRule for host demoapp.default.svc.cluster.local"),
        "{e}"
    );
}

#[test]
fn bookinfo_routes_bind_to_their_gateway_only() {
    let s = load_scenario("bookinfo-gateway.yaml");
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    assert_eq!(s.other_resources.len(), 1, "the Gateway stays untyped");
    assert!(
        s.l7.routes
            .mesh("productpage.default.svc.cluster.local", "default")
            .is_none(),
        "not bound to mesh"
    );
    let table =
        s.l7.routes
            .get(
                "default/bookinfo-gateway",
                "bookinfo.example.com",
                "default",
            )
            .expect("`*` host");
    for path in [
        "/productpage",
        "/static/css/x.css",
        "/login",
        "/logout",
        "/api/v1/products/1",
    ] {
        let req = Req::get(path);
        let m = table
            .match_http(&req.info())
            .unwrap_or_else(|| panic!("{path} routes"));
        let RouteAction::Forward(d) = &m.route.action else {
            panic!("forward")
        };
        assert_eq!(
            d[0].destination.host,
            "productpage.default.svc.cluster.local"
        );
        assert_eq!(d[0].destination.port, Some(9080));
    }
    for path in ["/productpage/x", "/", "/loginx", "/api/v2"] {
        assert!(
            table.match_http(&Req::get(path).info()).is_none(),
            "{path}: 404"
        );
    }
    assert_eq!(NO_ROUTE_STATUS, 404);
}

#[test]
fn serviceentry_scenario_loads_with_its_timeout_route() {
    let s = load_scenario("serviceentry.yaml");
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    let names: Vec<&str> =
        s.l7.service_entries
            .iter()
            .map(|e| e.name.as_str())
            .collect();
    assert_eq!(names, ["googleapis", "external-db"]);
    assert_eq!(
        s.l7.service_entries[1].spec.resolution,
        service_entry::Resolution::Static
    );
    assert!(s.l7.service_entries[0].covers("www.googleapis.com"));
    let table =
        s.l7.routes
            .mesh("www.googleapis.com", "default")
            .expect("table");
    let m = table.match_http(&Req::get("/").info()).expect("route");
    assert_eq!(m.route.timeout.map(|t| t.0.as_secs()), Some(10));
    assert_eq!(
        destinations(&m),
        [("www.googleapis.com".to_string(), None, 100)]
    );
}

#[test]
fn short_hosts_resolve_in_the_virtual_service_namespace() {
    let s = load(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: prod}
spec:
  hosts: [reviews, ratings.other, Details.Prod.Svc.Cluster.Local.]
  http:
  - route: [{destination: {host: reviews-v2}}]
"#,
    );
    let routes = &s.l7.routes;
    assert!(routes
        .mesh("reviews.prod.svc.cluster.local", "default")
        .is_some());
    assert!(
        routes.mesh("ratings.other", "default").is_some(),
        "dotted names are taken as written"
    );
    assert!(
        routes
            .mesh("details.prod.svc.cluster.local", "default")
            .is_some(),
        "lower-cased, trailing dot dropped"
    );
    assert!(routes
        .mesh("reviews.default.svc.cluster.local", "default")
        .is_none());
    let m = routes
        .mesh("reviews.prod.svc.cluster.local", "default")
        .and_then(|t| t.match_http(&Req::get("/").info()))
        .expect("route");
    assert_eq!(destinations(&m)[0].0, "reviews-v2.prod.svc.cluster.local");
    assert_eq!(resolve_host("*", "x", "cluster.local"), "*");
    assert_eq!(resolve_host("10.0.0.1", "x", "cluster.local"), "10.0.0.1");
}

#[test]
fn wildcard_hosts_pick_the_most_specific_table() {
    let vs = |name: &str, host: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\nspec:\n  hosts: [\"{host}\"]\n  http: [{{route: [{{destination: {{host: {name}.example.com}}}}]}}]\n---\n")
    };
    let s = load(
        &(vs("wide", "*.example.com")
            + &vs("narrow", "*.api.example.com")
            + &vs("exact", "a.api.example.com")),
    );
    let table = |h: &str| {
        s.l7.routes
            .mesh(h, "default")
            .map(|t| t.virtual_service.clone())
    };
    assert_eq!(table("a.api.example.com").as_deref(), Some("default/exact"));
    assert_eq!(
        table("b.api.example.com").as_deref(),
        Some("default/narrow")
    );
    assert_eq!(table("x.y.example.com").as_deref(), Some("default/wide"));
    assert_eq!(table("example.com"), None);
}

/// A one-route VirtualService for `demoapp` with the given match blocks.
fn with_match(matches: &str) -> Snapshot {
    load(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: m}}\nspec:\n  hosts: [demoapp]\n  http:\n  - match: {matches}\n    route: [{{destination: {{host: demoapp}}}}]\n"
    ))
}

fn hits(s: &Snapshot, req: &Req) -> bool {
    s.l7.routes
        .mesh(DEMOAPP, "default")
        .expect("table")
        .match_http(&req.info())
        .is_some()
}

#[test]
fn uri_exact_prefix_and_regex() {
    let s = with_match("[{uri: {exact: /a}}, {uri: {prefix: /b/}}, {uri: {regex: \"/c/[0-9]+\"}}]");
    assert!(hits(&s, &Req::get("/a")));
    assert!(
        hits(&s, &Req::get("/a?x=1")),
        "the query string is not part of the uri"
    );
    assert!(!hits(&s, &Req::get("/a/")));
    assert!(hits(&s, &Req::get("/b/x")));
    assert!(!hits(&s, &Req::get("/b")));
    assert!(hits(&s, &Req::get("/c/42")));
    assert!(!hits(&s, &Req::get("/d")));
}

#[test]
fn regex_must_match_the_whole_value() {
    let s = with_match("[{uri: {regex: \"/c/[0-9]+\"}}, {headers: {x-v: {regex: \"v[12]|v3\"}}}]");
    assert!(!hits(&s, &Req::get("/c/42/more")), "no implicit suffix");
    assert!(!hits(&s, &Req::get("/x/c/42")), "no implicit prefix");
    assert!(
        hits(&s, &Req::get("/").header("x-v", "v3")),
        "alternation is grouped before anchoring"
    );
    assert!(!hits(&s, &Req::get("/").header("x-v", "v1x")));
    assert!(!hits(&s, &Req::get("/").header("x-v", "xv3")));
}

#[test]
fn ignore_uri_case_applies_to_exact_and_prefix_not_regex() {
    let s = with_match("[{uri: {prefix: /Canary}, ignoreUriCase: true}, {uri: {exact: /EXACT}, ignoreUriCase: true}, {uri: {regex: /re}, ignoreUriCase: true}]");
    assert!(hits(&s, &Req::get("/canary/x")));
    assert!(hits(&s, &Req::get("/CANARY")));
    assert!(hits(&s, &Req::get("/exact")));
    assert!(hits(&s, &Req::get("/re")));
    assert!(
        !hits(&s, &Req::get("/RE")),
        "regexes stay case-sensitive, as in Istio"
    );
    let strict = with_match("[{uri: {prefix: /Canary}}]");
    assert!(!hits(&strict, &Req::get("/canary")));
}

#[test]
fn method_scheme_and_authority() {
    let s = with_match(
        "[{method: {exact: POST}, scheme: {exact: https}, authority: {prefix: \"api.\"}}]",
    );
    let ok = || {
        Req::get("/")
            .method("POST")
            .scheme("https")
            .authority("api.example.com")
    };
    assert!(hits(&s, &ok()));
    assert!(!hits(&s, &ok().method("GET")));
    assert!(!hits(&s, &ok().scheme("http")));
    assert!(!hits(&s, &ok().authority("www.example.com")));
}

#[test]
fn header_conditions_exact_prefix_regex_and_presence() {
    let s = with_match("[{headers: {end-user: {exact: jason}, x-trace: {}, x-env: {prefix: prod}, X-Num: {regex: \"[0-9]+\"}}}]");
    let ok = || {
        Req::get("/")
            .header("end-user", "jason")
            .header("x-trace", "")
            .header("x-env", "prod-eu")
            .header("x-num", "7")
    };
    assert!(hits(&s, &ok()));
    assert!(
        !hits(
            &s,
            &Req::get("/")
                .header("end-user", "jason")
                .header("x-env", "prod")
                .header("x-num", "7")
        ),
        "x-trace must be present"
    );
    assert!(
        !hits(&s, &ok().header("end-user", "again")),
        "repeated values are joined: \"jason,again\""
    );
    let regex_star = with_match("[{headers: {x-any: {regex: \"*\"}}}]");
    assert!(
        hits(&regex_star, &Req::get("/").header("x-any", "whatever")),
        "regex \"*\" is a presence check"
    );
    assert!(!hits(&regex_star, &Req::get("/")));
}

#[test]
fn without_headers_excludes_matching_or_present_headers() {
    let s = with_match("[{withoutHeaders: {x-debug: {}, x-env: {exact: test}}}]");
    assert!(
        hits(&s, &Req::get("/")),
        "absent headers satisfy withoutHeaders"
    );
    assert!(
        !hits(&s, &Req::get("/").header("x-debug", "0")),
        "presence check: must be absent"
    );
    assert!(!hits(&s, &Req::get("/").header("x-env", "test")));
    assert!(hits(&s, &Req::get("/").header("x-env", "prod")));
}

#[test]
fn query_params_exact_regex_and_presence() {
    let s =
        with_match("[{queryParams: {v: {exact: \"2\"}, id: {regex: \"[a-f0-9]{4}\"}, debug: {}}}]");
    assert!(hits(&s, &Req::get("/p?v=2&id=beef&debug")));
    assert!(
        hits(&s, &Req::get("/p?debug=1&id=be%65f&v=2")),
        "decoded, any order"
    );
    assert!(!hits(&s, &Req::get("/p?v=2&id=beef")));
    assert!(!hits(&s, &Req::get("/p?v=3&id=beef&debug")));
    assert!(!hits(&s, &Req::get("/p?v=2&id=beefy&debug")));
    assert!(!hits(&s, &Req::get("/p")));
}

#[test]
fn port_source_labels_and_namespace() {
    let s = with_match("[{port: 8080, sourceLabels: {app: proxy}, sourceNamespace: web}]");
    let ok = || {
        Req::get("/")
            .port(8080)
            .from("web", &[("app", "proxy"), ("version", "v1")])
    };
    assert!(hits(&s, &ok()));
    assert!(!hits(&s, &ok().port(9090)));
    assert!(!hits(&s, &ok().from("web", &[("app", "other")])));
    assert!(!hits(&s, &ok().from("other", &[("app", "proxy")])));
}

#[test]
fn blocks_or_conditions_and_first_route_wins() {
    let s = load(
        r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: order}
spec:
  hosts: [demoapp]
  http:
  - name: api
    match:
    - {uri: {prefix: /api}, method: {exact: POST}}
    - {headers: {x-api: {exact: "1"}}}
    route: [{destination: {host: demoapp, port: {number: 1}}}]
  - name: fallback
    route: [{destination: {host: demoapp, port: {number: 2}}}]
  - name: unreachable
    route: [{destination: {host: demoapp, port: {number: 3}}}]
"#,
    );
    let table = s.l7.routes.mesh(DEMOAPP, "default").expect("table");
    let name = |req: Req| table.match_http(&req.info()).and_then(|m| m.name());
    assert_eq!(
        name(Req::get("/api/x").method("POST")).as_deref(),
        Some("api")
    );
    assert_eq!(
        name(Req::get("/api/x")).as_deref(),
        Some("fallback"),
        "AND inside a block"
    );
    assert_eq!(
        name(Req::get("/").header("x-api", "1")).as_deref(),
        Some("api"),
        "OR across blocks"
    );
    let m = table
        .match_http(&Req::get("/").header("x-api", "1").info())
        .expect("match");
    assert_eq!(
        (m.route_index, m.matched.map(|b| b.headers.len())),
        (0, Some(1))
    );
}

#[test]
fn authority_rewrite_precedence() {
    let vs = |route_extra: &str| {
        load(&format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: a}}\nspec:\n  hosts: [demoapp]\n  http:\n  - route: [{{destination: {{host: demoapp}}, headers: {{request: {{set: {{host: dest.example}}}}}}}}]\n{route_extra}"
        ))
    };
    let authority = |s: &Snapshot| {
        let table = s.l7.routes.mesh(DEMOAPP, "default").expect("table");
        let req = Req::get("/");
        let m = table.match_http(&req.info()).expect("route");
        let RouteAction::Forward(d) = &m.route.action else {
            panic!("forward")
        };
        m.rewritten_authority(&d[0]).map(str::to_string)
    };
    assert_eq!(authority(&vs("")).as_deref(), Some("dest.example"));
    assert_eq!(
        authority(&vs(
            "    headers: {request: {set: {host: route.example}}}\n"
        ))
        .as_deref(),
        Some("route.example")
    );
    assert_eq!(
        authority(&vs("    headers: {request: {set: {host: route.example}}}\n    rewrite: {authority: rewrite.example}\n")).as_deref(),
        Some("rewrite.example")
    );
}
