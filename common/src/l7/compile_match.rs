//! Compiling VirtualService match blocks: `StringMatch` with Istio's rules (exactly one of
//! exact/prefix/regex, `{}` or regex `"*"` as a presence check where Istio allows it, empty
//! prefix/regex refused), regexes anchored `^(?:…)$` so they must match the whole value, header
//! names validated and lower-cased, and the match-level gateways normalised.

use super::compile::gateway_name;
use super::route::{HeaderCondition, QueryCondition, RouteMatch, StrMatch};
use super::spec::StringMatch;
use super::virtual_service::HttpMatchRequest;
use http::HeaderName;
use regex::Regex;
use std::collections::BTreeMap;

type E = (String, String);

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, E> {
    Err((field.into(), message.into()))
}

/// Compiles `sm`: exactly one of exact/prefix/regex; with `allow_present`, `{}` and regex `"*"`
/// mean "present" (headers, query parameters, method, scheme, authority).
pub(crate) fn string_match(
    sm: &StringMatch,
    path: &str,
    allow_present: bool,
) -> Result<StrMatch, E> {
    let set = [sm.exact.is_some(), sm.prefix.is_some(), sm.regex.is_some()];
    match set.iter().filter(|s| **s).count() {
        0 if allow_present => return Ok(StrMatch::Present),
        0 => return err(path, "set one of exact, prefix, regex"),
        1 => {}
        _ => return err(path, "set only one of exact, prefix, regex"),
    }
    if let Some(e) = &sm.exact {
        return Ok(StrMatch::Exact(e.clone()));
    }
    if let Some(p) = &sm.prefix {
        if p.is_empty() {
            return err(format!("{path}.prefix"), "must not be empty");
        }
        return Ok(StrMatch::Prefix(p.clone()));
    }
    let re = sm.regex.as_deref().unwrap_or_default();
    if re == "*" && allow_present {
        return Ok(StrMatch::Present);
    }
    anchored(re, &format!("{path}.regex")).map(StrMatch::Regex)
}

/// Compiles an Istio (RE2) regex that must match the whole string.
pub(crate) fn anchored(re: &str, path: &str) -> Result<Regex, E> {
    if re.is_empty() {
        return err(path, "must not be empty");
    }
    Regex::new(&format!("^(?:{re})$")).map_err(|e| {
        let detail = e.to_string();
        let last = detail
            .lines()
            .last()
            .unwrap_or("")
            .trim()
            .trim_start_matches("error: ");
        (path.to_string(), format!("invalid regex {re:?}: {last}"))
    })
}

fn header_conditions(
    map: &BTreeMap<String, StringMatch>,
    path: &str,
) -> Result<Vec<HeaderCondition>, E> {
    let mut out = Vec::new();
    for (name, sm) in map {
        let p = format!("{path}.{name}");
        if matches!(name.as_str(), "uri" | "scheme" | "method" | "authority") {
            continue; // Istio ignores these keys in headers
        }
        if name.starts_with("@request.auth.claims") {
            return err(p, "routing on JWT claims is not supported (no RequestAuthentication in this data plane)");
        }
        let header = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| (p.clone(), format!("{name:?} is not a valid header name")))?;
        out.push(HeaderCondition {
            name: header,
            matcher: string_match(sm, &p, true)?,
        });
    }
    Ok(out)
}

pub(crate) fn compile_match(
    m: &HttpMatchRequest,
    path: &str,
    ns: &str,
) -> Result<(RouteMatch, Vec<String>), E> {
    let opt = |sm: &Option<StringMatch>, key: &str, present: bool| {
        sm.as_ref()
            .map(|s| string_match(s, &format!("{path}.{key}"), present))
            .transpose()
    };
    let uri = match &m.uri {
        // `uri: {}` matches every path (Istio's prefix "/").
        Some(s) if *s == StringMatch::default() => None,
        other => opt(other, "uri", false)?,
    };
    let mut query_params = Vec::new();
    for (name, sm) in &m.query_params {
        let p = format!("{path}.queryParams.{name}");
        if sm.prefix.is_some() {
            return err(
                format!("{p}.prefix"),
                "prefix matching of query parameters is not supported (use exact or regex)",
            );
        }
        query_params.push(QueryCondition {
            name: name.clone(),
            matcher: string_match(sm, &p, true)?,
        });
    }
    let route_match = RouteMatch {
        name: m.name.clone().filter(|n| !n.is_empty()),
        uri,
        ignore_uri_case: m.ignore_uri_case,
        scheme: opt(&m.scheme, "scheme", true)?,
        method: opt(&m.method, "method", true)?,
        authority: opt(&m.authority, "authority", true)?,
        headers: header_conditions(&m.headers, &format!("{path}.headers"))?,
        without_headers: header_conditions(&m.without_headers, &format!("{path}.withoutHeaders"))?,
        query_params,
        port: m.port.filter(|p| *p != 0),
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone().filter(|s| !s.is_empty()),
        parent: None,
    };
    let gateways = m.gateways.iter().map(|g| gateway_name(g, ns)).collect();
    Ok((route_match, gateways))
}
