//! Request rewriting for a matched route: URI rewrite with Istio's prefix semantics (the matched
//! prefix is replaced, the query string kept) or a regex rewrite, redirect `Location`
//! construction, and `headers.request/response` `set`/`add`/`remove` over an `http::HeaderMap`
//! (removes first, then sets, then adds, as Envoy does; destination-level operations are applied
//! before route-level ones so the route level wins on `set`).

use super::route::StrMatch;
use super::virtual_service::{HeaderOperationsSpec, Headers};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use regex::Regex;
use serde::Serialize;

/// A compiled `rewrite`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri_regex: Option<RegexRewrite>,
}

/// `uriRegexRewrite`: every match of `pattern` in the path is replaced by `rewrite` (RE2 style
/// `\1` group references).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegexRewrite {
    #[serde(rename = "match", serialize_with = "super::ser::regex")]
    pub pattern: Regex,
    pub rewrite: String,
    /// `rewrite` in the `regex` crate's replacement syntax (`${1}`).
    #[serde(skip)]
    pub(crate) replacement: String,
}

impl RegexRewrite {
    pub fn new(pattern: Regex, rewrite: String) -> Self {
        let replacement = re2_replacement(&rewrite);
        RegexRewrite {
            pattern,
            rewrite,
            replacement,
        }
    }
}

/// Converts an RE2 substitution (`\1`, `\\`) to the `regex` crate's form (`${1}`, `$$`).
fn re2_replacement(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek().copied() {
                Some(d) if d.is_ascii_digit() => {
                    chars.next();
                    out.push_str(&format!("${{{d}}}"));
                }
                Some('\\') => {
                    chars.next();
                    out.push('\\');
                }
                _ => out.push('\\'),
            },
            other => out.push(other),
        }
    }
    out
}

/// Splits `path?query` into the path and the `?query` suffix (empty when absent).
pub fn split_path(path_and_query: &str) -> (&str, &str) {
    match path_and_query.find('?') {
        Some(i) => path_and_query.split_at(i),
        None => (path_and_query, ""),
    }
}

/// The new `path?query` for a request that matched with uri condition `matched` (`None`: the
/// route had no uri condition, which Istio treats as prefix `/`). `None` when the rewrite leaves
/// the path alone.
///
/// Prefix semantics: the matched prefix is replaced by `rewrite.uri`; a slash doubled at the
/// junction is collapsed, so prefix `/canary` + rewrite `/` turns `/canary/x` into `/x` and
/// `/canary` into `/` (what users expect, and what Istio does for Gateway API routes; Envoy's
/// literal `prefix_rewrite` would give `//x`). An exact or regex uri condition matched the whole
/// path, so the whole path is replaced. The query string is always kept.
pub fn rewrite_path(
    rewrite: &Rewrite,
    matched: Option<&StrMatch>,
    path_and_query: &str,
) -> Option<String> {
    let (path, query) = split_path(path_and_query);
    if let Some(rr) = &rewrite.uri_regex {
        let new = rr.pattern.replace_all(path, rr.replacement.as_str());
        return Some(format!("{new}{query}"));
    }
    let uri = rewrite.uri.as_deref()?;
    let rest = match matched {
        Some(StrMatch::Prefix(p)) => path.get(p.len()..).unwrap_or(""),
        Some(_) => "",
        None => path.strip_prefix('/').unwrap_or(path),
    };
    let mut out = String::with_capacity(uri.len() + rest.len() + query.len());
    out.push_str(uri);
    if uri.ends_with('/') && rest.starts_with('/') {
        out.push_str(&rest[1..]);
    } else {
        out.push_str(rest);
    }
    if out.is_empty() {
        out.push('/');
    }
    out.push_str(query);
    Some(out)
}

/// Where a redirect takes the port of its `Location` from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RedirectPort {
    /// The scheme's default port (nothing written), Istio's `FROM_PROTOCOL_DEFAULT`.
    ProtocolDefault,
    /// The port the request arrived on (`derivePort: FROM_REQUEST_PORT`).
    FromRequest,
    Port(u16),
}

/// A compiled `redirect`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    /// `None`: keep whatever port the request's authority carried.
    pub port: Option<RedirectPort>,
    pub scheme: Option<String>,
    pub code: u16,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// Splits `host[:port]` (IPv6 literals in brackets) into host and port.
pub fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if let Some(end) = authority.strip_prefix('[').and_then(|a| a.find(']')) {
        let host = &authority[..end + 2];
        let port = authority[end + 2..]
            .strip_prefix(':')
            .and_then(|p| p.parse().ok());
        return (host, port);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

impl Redirect {
    /// The status and `Location` for a request with `scheme`, `authority`, `path_and_query`
    /// that arrived on `request_port`. The request's query string is kept unless the redirect
    /// `uri` carries its own; a port equal to the scheme's default is not written; the request's
    /// own port is dropped when the redirect sets a port or changes the scheme.
    pub fn location(
        &self,
        scheme: &str,
        authority: &str,
        path_and_query: &str,
        request_port: u16,
    ) -> (StatusCode, String) {
        let req_scheme = if scheme.is_empty() { "http" } else { scheme };
        let final_scheme = self.scheme.as_deref().unwrap_or(req_scheme);
        let scheme_changed = final_scheme != req_scheme;
        let (host, mut port) = match &self.authority {
            Some(a) => split_authority(a),
            None => {
                let (h, p) = split_authority(authority);
                (h, p.filter(|_| !scheme_changed))
            }
        };
        match self.port {
            Some(RedirectPort::Port(p)) => port = Some(p),
            Some(RedirectPort::FromRequest) => port = Some(request_port),
            Some(RedirectPort::ProtocolDefault) => port = None,
            None => {}
        }
        if port.is_some() && port == default_port(final_scheme) {
            port = None;
        }
        let path = match &self.uri {
            Some(uri) if uri.contains('?') => uri.clone(),
            Some(uri) => format!("{uri}{}", split_path(path_and_query).1),
            None => path_and_query.to_string(),
        };
        let port = port.map(|p| format!(":{p}")).unwrap_or_default();
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
        (code, format!("{final_scheme}://{host}{port}{path}"))
    }
}

/// One direction's header operations, ready to apply.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOperations {
    #[serde(
        serialize_with = "super::ser::header_pairs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub set: Vec<(HeaderName, HeaderValue)>,
    #[serde(
        serialize_with = "super::ser::header_pairs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub add: Vec<(HeaderName, HeaderValue)>,
    #[serde(
        serialize_with = "super::ser::header_names",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub remove: Vec<HeaderName>,
}

impl HeaderOperations {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Removes, then sets (replacing every value), then appends.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// Compiled `headers` of a route or destination.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOps {
    #[serde(skip_serializing_if = "HeaderOperations::is_empty")]
    pub request: HeaderOperations,
    #[serde(skip_serializing_if = "HeaderOperations::is_empty")]
    pub response: HeaderOperations,
    /// `host` / `:authority` in `request.set` (or `add`): Istio turns it into an authority
    /// rewrite instead of a header operation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty() && self.authority.is_none()
    }
}

/// Applies destination-level then route-level operations (the route level wins on `set`).
pub fn apply_layers(layers: &[&HeaderOperations], headers: &mut HeaderMap) {
    for ops in layers {
        ops.apply(headers);
    }
}

/// Headers Istio never lets a route modify: pseudo-headers and `host`.
fn is_internal(name: &str) -> bool {
    name.starts_with(':') || name.eq_ignore_ascii_case("host")
}

fn is_authority(name: &str) -> bool {
    name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host")
}

fn header_name(name: &str, path: &str) -> Result<HeaderName, (String, String)> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| {
        (
            path.to_string(),
            format!("{name:?} is not a valid header name"),
        )
    })
}

fn compile_operations(
    spec: &HeaderOperationsSpec,
    path: &str,
    authority: &mut Option<String>,
) -> Result<HeaderOperations, (String, String)> {
    let mut out = HeaderOperations::default();
    let pairs =
        |map: &std::collections::BTreeMap<String, String>, key: &str, auth: &mut Option<String>| {
            let mut v = Vec::new();
            for (name, value) in map {
                let p = format!("{path}.{key}.{name}");
                if is_authority(name) {
                    *auth = Some(value.clone());
                    continue;
                }
                if is_internal(name) {
                    continue;
                }
                let hv = HeaderValue::from_str(value)
                    .map_err(|_| (p.clone(), format!("{value:?} is not a valid header value")))?;
                v.push((header_name(name, &p)?, hv));
            }
            Ok::<_, (String, String)>(v)
        };
    // `set` wins over `add` for the authority.
    let mut add_auth = None;
    out.add = pairs(&spec.add, "add", &mut add_auth)?;
    let mut set_auth = None;
    out.set = pairs(&spec.set, "set", &mut set_auth)?;
    if let Some(a) = set_auth.or(add_auth) {
        *authority = Some(a);
    }
    for (i, name) in spec.remove.iter().enumerate() {
        if is_internal(name) {
            continue;
        }
        out.remove
            .push(header_name(name, &format!("{path}.remove[{i}]"))?);
    }
    Ok(out)
}

/// Compiles a `headers` block found at `path`.
pub fn compile_header_ops(spec: &Headers, path: &str) -> Result<HeaderOps, (String, String)> {
    let mut authority = None;
    let request = match &spec.request {
        Some(r) => compile_operations(r, &format!("{path}.request"), &mut authority)?,
        None => HeaderOperations::default(),
    };
    let mut ignored = None;
    let response = match &spec.response {
        Some(r) => compile_operations(r, &format!("{path}.response"), &mut ignored)?,
        None => HeaderOperations::default(),
    };
    Ok(HeaderOps {
        request,
        response,
        authority,
    })
}

#[cfg(test)]
#[path = "rewrite_tests.rs"]
mod tests;
