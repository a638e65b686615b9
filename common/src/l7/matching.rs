//! Matching a request against a [`RouteTable`]: `http` routes in order, first match wins; match
//! blocks OR, conditions inside a block AND. The uri is matched without its query string (as
//! Envoy does); header values are the comma-joined values of every occurrence; query parameters
//! are percent-decoded, first occurrence wins; `withoutHeaders` follows Istio's translation (a
//! missing header counts as empty, a presence check requires absence). No match means 404.
//! Also matches `tcp` and `tls` routes of a connection.

use super::compile::host_matches;
use super::rewrite::{rewrite_path, split_path};
use super::route::{
    HeaderCondition, HttpRoute, L4Match, L4Route, RouteMatch, RouteTable, StrMatch,
    WeightedDestination,
};
use crate::snapshot::selector_matches;
use http::HeaderMap;
use std::cell::OnceCell;
use std::net::IpAddr;

/// The status the waypoint answers when a VirtualService applies but no route matches.
pub const NO_ROUTE_STATUS: u16 = 404;

/// What the matcher needs to know about one HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    /// `http` or `https` (the `:scheme`).
    pub scheme: &'a str,
    /// `:authority` / `Host`, as received.
    pub authority: &'a str,
    /// Path with the query string.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The service port the request was sent to.
    pub port: u16,
    /// Labels of the source workload (empty when unknown).
    pub source_labels: &'a crate::model::Labels,
    /// Namespace of the source workload (empty when unknown).
    pub source_namespace: &'a str,
    pub source_ip: Option<IpAddr>,
}

/// The route a request matched.
#[derive(Debug, Clone, Copy)]
pub struct HttpMatch<'t> {
    pub route: &'t HttpRoute,
    /// Index of the route in the table's `http` list.
    pub route_index: usize,
    /// The match block that matched (`None`: the route has no match blocks).
    pub matched: Option<&'t RouteMatch>,
}

impl HttpMatch<'_> {
    /// Istio's route name: `<route name>.<match name>` when both are set.
    pub fn name(&self) -> Option<String> {
        let route = self.route.name.as_deref();
        let block = self.matched.and_then(|m| m.name.as_deref());
        match (route, block) {
            (Some(r), Some(b)) => Some(format!("{r}.{b}")),
            (Some(r), None) => Some(r.to_string()),
            (None, Some(b)) => Some(b.to_string()),
            (None, None) => None,
        }
    }

    /// The rewritten `path?query` for `path_and_query`, or `None` when the route has no uri
    /// rewrite. Prefix rewrites replace the prefix of the match block that matched.
    pub fn rewritten_path(&self, path_and_query: &str) -> Option<String> {
        let rewrite = self.route.rewrite.as_ref()?;
        rewrite_path(
            rewrite,
            self.matched.and_then(RouteMatch::effective_uri),
            path_and_query,
        )
    }
}

impl HttpMatch<'_> {
    /// The authority to send upstream to `dest` (one of this route's destinations), if it is
    /// rewritten: `rewrite.authority`, else a `host` set by the route's request headers, else
    /// one set by the destination's (Istio's precedence).
    pub fn rewritten_authority<'d>(&'d self, dest: &'d WeightedDestination) -> Option<&'d str> {
        self.route
            .rewrite
            .as_ref()
            .and_then(|r| r.authority.as_deref())
            .or(self.route.headers.authority.as_deref())
            .or(dest.headers.authority.as_deref())
    }
}

impl RouteTable {
    /// The first `http` route matching `req`, or `None` (answer [`NO_ROUTE_STATUS`]).
    pub fn match_http<'t>(&'t self, req: &RequestInfo) -> Option<HttpMatch<'t>> {
        let query = OnceCell::new();
        for (route_index, route) in self.http.iter().enumerate() {
            if route.matches.is_empty() {
                return Some(HttpMatch {
                    route,
                    route_index,
                    matched: None,
                });
            }
            if let Some(m) = route.matches.iter().find(|m| block_matches(m, req, &query)) {
                return Some(HttpMatch {
                    route,
                    route_index,
                    matched: Some(m),
                });
            }
        }
        None
    }

    /// The first `tcp` route matching a connection.
    pub fn match_tcp(&self, conn: &L4Info) -> Option<&L4Route> {
        first_l4(&self.tcp, conn)
    }

    /// The first `tls` route matching a connection (its `sni` must be set to match `sniHosts`).
    pub fn match_tls(&self, conn: &L4Info) -> Option<&L4Route> {
        first_l4(&self.tls, conn)
    }
}

/// What the matcher needs to know about a TCP/TLS connection.
#[derive(Debug, Clone, Copy)]
pub struct L4Info<'a> {
    pub port: u16,
    pub destination_ip: Option<IpAddr>,
    pub source_labels: &'a crate::model::Labels,
    pub source_namespace: &'a str,
    /// TLS server name, for `tls` routes.
    pub sni: Option<&'a str>,
}

fn first_l4<'t>(routes: &'t [L4Route], conn: &L4Info) -> Option<&'t L4Route> {
    routes
        .iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| l4_matches(m, conn)))
}

fn l4_matches(m: &L4Match, conn: &L4Info) -> bool {
    m.port.is_none_or(|p| p == conn.port)
        && (m.destination_subnets.is_empty()
            || conn.destination_ip.is_some_and(|ip| {
                m.destination_subnets
                    .iter()
                    .any(|n| n.contains(&ip.to_canonical()))
            }))
        && selector_matches(&m.source_labels, conn.source_labels)
        && m.source_namespace
            .as_deref()
            .is_none_or(|ns| ns == conn.source_namespace)
        && (m.sni_hosts.is_empty()
            || conn.sni.is_some_and(|sni| {
                let sni = sni.to_ascii_lowercase();
                m.sni_hosts.iter().any(|h| host_matches(h, &sni))
            }))
}

/// Whether one match block (and its delegate parent) matches `req`.
fn block_matches(
    m: &RouteMatch,
    req: &RequestInfo,
    query: &OnceCell<Vec<(String, String)>>,
) -> bool {
    let (path, query_str) = split_path(req.path);
    let uri_ok = match &m.uri {
        None => true,
        Some(u) if m.ignore_uri_case => u.matches_ignore_case(path),
        Some(u) => u.matches(path),
    };
    uri_ok
        && m.port.is_none_or(|p| p == req.port)
        && m.method.as_ref().is_none_or(|s| s.matches(req.method))
        && m.scheme.as_ref().is_none_or(|s| s.matches(req.scheme))
        && m.authority
            .as_ref()
            .is_none_or(|s| s.matches(req.authority))
        && m.source_namespace
            .as_deref()
            .is_none_or(|ns| ns == req.source_namespace)
        && selector_matches(&m.source_labels, req.source_labels)
        && m.headers.iter().all(|h| header_matches(h, req.headers))
        && m.without_headers
            .iter()
            .all(|h| without_header_matches(h, req.headers))
        && (m.query_params.is_empty() || {
            let params =
                query.get_or_init(|| parse_query(query_str.strip_prefix('?').unwrap_or("")));
            m.query_params.iter().all(|q| {
                params
                    .iter()
                    .find(|(k, _)| *k == q.name)
                    .is_some_and(|(_, v)| q.matcher.matches(v))
            })
        })
        && m.parent
            .as_deref()
            .is_none_or(|p| block_matches(p, req, query))
}

/// All values of a header joined with `,` (Envoy's view of a repeated header).
pub fn header_value(headers: &HeaderMap, name: &http::HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut out = String::from_utf8_lossy(first.as_bytes()).into_owned();
    for v in values {
        out.push(',');
        out.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(out)
}

fn header_matches(h: &HeaderCondition, headers: &HeaderMap) -> bool {
    header_value(headers, &h.name).is_some_and(|v| h.matcher.matches(&v))
}

/// Inverted header match: presence check → the header must be absent; otherwise a missing
/// header is treated as empty and the value must not match.
fn without_header_matches(h: &HeaderCondition, headers: &HeaderMap) -> bool {
    match (&h.matcher, header_value(headers, &h.name)) {
        (StrMatch::Present, v) => v.is_none(),
        (m, v) => !m.matches(v.as_deref().unwrap_or("")),
    }
}

/// Parses a query string into percent-decoded `(name, value)` pairs in order (`a` without `=`
/// has an empty value). `+` is kept literally, as Envoy does.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(pair), String::new()),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_split_and_decoded() {
        assert_eq!(
            parse_query("a=1&b=x%20y&flag&c=%zz&d=1+2"),
            [
                ("a", "1"),
                ("b", "x y"),
                ("flag", ""),
                ("c", "%zz"),
                ("d", "1+2")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert!(parse_query("").is_empty());
    }

    #[test]
    fn repeated_headers_are_joined() {
        let mut h = HeaderMap::new();
        h.append("x-a", http::HeaderValue::from_static("1"));
        h.append("x-a", http::HeaderValue::from_static("2"));
        let name = http::HeaderName::from_static("x-a");
        assert_eq!(header_value(&h, &name).as_deref(), Some("1,2"));
        assert_eq!(
            header_value(&h, &http::HeaderName::from_static("x-b")),
            None
        );
    }
}
