//! Specifications of URI rewrites (prefix edge cases, whole-path and regex rewrites), redirect
//! `Location`s and header operations.

use super::*;

fn prefix_rewrite(uri: &str, prefix: Option<&str>, path: &str) -> Option<String> {
    let rw = Rewrite {
        uri: Some(uri.into()),
        ..Rewrite::default()
    };
    let m = prefix.map(|p| StrMatch::Prefix(p.into()));
    rewrite_path(&rw, m.as_ref(), path)
}

#[test]
fn prefix_rewrite_replaces_the_matched_prefix() {
    assert_eq!(
        prefix_rewrite("/", Some("/canary"), "/canary/x").as_deref(),
        Some("/x")
    );
    assert_eq!(
        prefix_rewrite("/", Some("/canary"), "/canary").as_deref(),
        Some("/")
    );
    assert_eq!(
        prefix_rewrite("/", Some("/canary"), "/canary/").as_deref(),
        Some("/")
    );
    assert_eq!(
        prefix_rewrite("/", Some("/canary"), "/canaryfoo").as_deref(),
        Some("/foo")
    );
    assert_eq!(
        prefix_rewrite("/", Some("/canary/"), "/canary/x").as_deref(),
        Some("/x")
    );
    assert_eq!(
        prefix_rewrite("/v2", Some("/v1"), "/v1/users?id=3").as_deref(),
        Some("/v2/users?id=3")
    );
    assert_eq!(
        prefix_rewrite("/v2/", Some("/v1"), "/v1/users").as_deref(),
        Some("/v2/users"),
        "no doubled slash"
    );
    assert_eq!(
        prefix_rewrite("/api", Some("/"), "/x").as_deref(),
        Some("/apix"),
        "Envoy's literal prefix swap"
    );
    assert_eq!(
        prefix_rewrite("/api", None, "/x").as_deref(),
        Some("/apix"),
        "no uri match = prefix /"
    );
    assert_eq!(
        prefix_rewrite("/", Some("/canary"), "/canary?q=1").as_deref(),
        Some("/?q=1"),
        "query kept"
    );
}

#[test]
fn exact_and_regex_matches_rewrite_the_whole_path() {
    let rw = Rewrite {
        uri: Some("/new".into()),
        ..Rewrite::default()
    };
    assert_eq!(
        rewrite_path(&rw, Some(&StrMatch::Exact("/old".into())), "/old?a=b").as_deref(),
        Some("/new?a=b")
    );
    let re = StrMatch::Regex(Regex::new("^(?:/o.*)$").expect("re"));
    assert_eq!(
        rewrite_path(&rw, Some(&re), "/old/deep").as_deref(),
        Some("/new")
    );
    assert_eq!(
        rewrite_path(&Rewrite::default(), None, "/x"),
        None,
        "no uri rewrite"
    );
}

#[test]
fn regex_rewrite_substitutes_groups_in_the_path_only() {
    let rr = RegexRewrite::new(
        Regex::new("^/service/([^/]+)(/.*)$").expect("re"),
        "\\2/instance/\\1".into(),
    );
    let rw = Rewrite {
        uri_regex: Some(rr),
        ..Rewrite::default()
    };
    assert_eq!(
        rewrite_path(&rw, None, "/service/foo/v1/api?x=1").as_deref(),
        Some("/v1/api/instance/foo?x=1")
    );
    let all = RegexRewrite::new(Regex::new("a").expect("re"), "$b".into());
    let rw = Rewrite {
        uri_regex: Some(all),
        ..Rewrite::default()
    };
    assert_eq!(
        rewrite_path(&rw, None, "/aXa").as_deref(),
        Some("/$bX$b"),
        "every match; `$` is literal"
    );
}

fn redirect(
    uri: Option<&str>,
    authority: Option<&str>,
    port: Option<RedirectPort>,
    scheme: Option<&str>,
    code: u16,
) -> Redirect {
    Redirect {
        uri: uri.map(Into::into),
        authority: authority.map(Into::into),
        port,
        scheme: scheme.map(Into::into),
        code,
    }
}

#[test]
fn redirect_builds_the_location() {
    let r = redirect(
        Some("/v1/bookRatings"),
        Some("newratings.default.svc.cluster.local"),
        None,
        None,
        301,
    );
    assert_eq!(
        r.location("http", "ratings:9080", "/v1/getProductRatings?id=1", 9080),
        (
            StatusCode::MOVED_PERMANENTLY,
            "http://newratings.default.svc.cluster.local/v1/getProductRatings?id=1"
                .replace("/v1/getProductRatings", "/v1/bookRatings")
        )
    );
    let https = redirect(None, None, None, Some("https"), 308);
    assert_eq!(
        https.location("http", "shop.example:80", "/cart", 80),
        (
            StatusCode::PERMANENT_REDIRECT,
            "https://shop.example/cart".into()
        )
    );
    let port = redirect(
        None,
        None,
        Some(RedirectPort::Port(8443)),
        Some("https"),
        302,
    );
    assert_eq!(
        port.location("http", "shop.example", "/", 80).1,
        "https://shop.example:8443/"
    );
    let default_port = redirect(
        None,
        None,
        Some(RedirectPort::Port(443)),
        Some("https"),
        302,
    );
    assert_eq!(
        default_port.location("http", "shop.example", "/", 80).1,
        "https://shop.example/"
    );
    let from_req = redirect(
        Some("/x?y=1"),
        None,
        Some(RedirectPort::FromRequest),
        None,
        307,
    );
    assert_eq!(
        from_req.location("http", "h:8080", "/a?b=2", 8080),
        (StatusCode::TEMPORARY_REDIRECT, "http://h:8080/x?y=1".into())
    );
    let keep = redirect(Some("/moved"), None, None, None, 302);
    assert_eq!(
        keep.location("http", "[::1]:8080", "/old", 8080).1,
        "http://[::1]:8080/moved"
    );
}

#[test]
fn authorities_split_into_host_and_port() {
    assert_eq!(split_authority("a.example:8080"), ("a.example", Some(8080)));
    assert_eq!(split_authority("a.example"), ("a.example", None));
    assert_eq!(split_authority("[fd00::1]:443"), ("[fd00::1]", Some(443)));
    assert_eq!(split_authority("[fd00::1]"), ("[fd00::1]", None));
    assert_eq!(split_authority("fd00::1"), ("fd00::1", None));
}

fn ops(yaml: &str) -> Result<HeaderOps, (String, String)> {
    let spec: Headers = serde_yaml_ng::from_str(yaml).expect("headers spec");
    compile_header_ops(&spec, "spec.http[0].headers")
}

fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

fn values(h: &HeaderMap, k: &str) -> Vec<String> {
    h.get_all(k)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

#[test]
fn header_operations_remove_then_set_then_add() {
    let o = ops("{request: {set: {x-env: prod, X-Mode: a}, add: {x-tag: t2}, remove: [x-secret, x-env]}, response: {add: {x-served-by: waypoint}}}").expect("ok");
    let mut h = map(&[
        ("x-env", "dev"),
        ("x-env", "qa"),
        ("x-tag", "t1"),
        ("x-secret", "s"),
    ]);
    o.request.apply(&mut h);
    assert_eq!(
        values(&h, "x-env"),
        ["prod"],
        "set replaces every value (and survives the remove)"
    );
    assert_eq!(values(&h, "x-mode"), ["a"], "names are lower-cased");
    assert_eq!(values(&h, "x-tag"), ["t1", "t2"], "add appends");
    assert!(h.get("x-secret").is_none());
    let mut resp = HeaderMap::new();
    o.response.apply(&mut resp);
    assert_eq!(values(&resp, "x-served-by"), ["waypoint"]);
}

#[test]
fn route_level_operations_win_over_destination_level() {
    let dest = ops("{request: {set: {x-v: dest}, add: {x-d: '1'}}}").expect("ok");
    let route = ops("{request: {set: {x-v: route}, remove: [x-d]}}").expect("ok");
    let mut h = HeaderMap::new();
    apply_layers(&[&dest.request, &route.request], &mut h);
    assert_eq!(values(&h, "x-v"), ["route"]);
    assert!(h.get("x-d").is_none());
}

#[test]
fn host_headers_become_an_authority_rewrite() {
    let o = ops("{request: {set: {host: set.example}, add: {':authority': add.example, x-a: b}, remove: [host, ':path']}}").expect("ok");
    assert_eq!(
        o.authority.as_deref(),
        Some("set.example"),
        "set wins over add"
    );
    assert_eq!(o.request.add.len(), 1);
    assert!(
        o.request.set.is_empty() && o.request.remove.is_empty(),
        "internal headers are never touched"
    );
}

#[test]
fn invalid_header_names_and_values_are_rejected() {
    assert_eq!(
        ops("{request: {set: {\"bad name\": x}}}")
            .expect_err("name")
            .0,
        "spec.http[0].headers.request.set.bad name"
    );
    assert_eq!(
        ops("{response: {remove: [\"a b\"]}}").expect_err("name").0,
        "spec.http[0].headers.response.remove[0]"
    );
    assert_eq!(
        ops("{request: {add: {x-a: \"line\\nbreak\"}}}")
            .expect_err("value")
            .0,
        "spec.http[0].headers.request.add.x-a"
    );
}
