//! CORS for a route (`corsPolicy`), with the semantics of Envoy's CORS filter as Istio configures
//! it: origin matching (`allowOrigins` exact/prefix/regex, or the deprecated exact `allowOrigin`;
//! a matcher that matches `"*"` allows every origin), preflight answers and the headers added to
//! actual responses. Requests without an allowed `Origin` pass through untouched.

use super::route::StrMatch;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
};
use http::{HeaderMap, HeaderValue, Method};
use serde::Serialize;

/// A compiled `corsPolicy`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CorsPolicy {
    pub allow_origins: Vec<StrMatch>,
    /// Comma-joined, as sent in `access-control-allow-methods` (empty: header not sent).
    pub allow_methods: String,
    pub allow_headers: String,
    pub expose_headers: String,
    /// Whole seconds, as sent in `access-control-max-age`.
    pub max_age: Option<u64>,
    pub allow_credentials: Option<bool>,
    /// Preflights from disallowed origins go upstream (Istio's default) instead of being
    /// answered without CORS headers (`unmatchedPreflights: IGNORE`).
    pub forward_unmatched_preflights: bool,
}

/// What to do with a preflight request.
#[derive(Debug, Clone, PartialEq)]
pub enum Preflight {
    /// Answer `200` with these headers (empty when the origin is not allowed and
    /// `unmatchedPreflights: IGNORE`).
    Respond(HeaderMap),
    /// Send the request upstream like any other.
    Forward,
}

fn value(s: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(s).ok()
}

impl CorsPolicy {
    /// Whether `origin` is allowed.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.allow_origins
            .iter()
            .any(|m| m.matches("*") || m.matches(origin))
    }

    fn allowed_origin<'h>(&self, headers: &'h HeaderMap) -> Option<&'h HeaderValue> {
        let origin = headers.get(ORIGIN)?;
        origin
            .to_str()
            .ok()
            .filter(|o| !o.is_empty() && self.origin_allowed(o))
            .map(|_| origin)
    }

    /// `None` when the request is not a CORS preflight (an `OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`).
    pub fn preflight(&self, method: &Method, headers: &HeaderMap) -> Option<Preflight> {
        if method != Method::OPTIONS
            || !headers.contains_key(ORIGIN)
            || !headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
        {
            return None;
        }
        let Some(origin) = self.allowed_origin(headers) else {
            return Some(if self.forward_unmatched_preflights {
                Preflight::Forward
            } else {
                Preflight::Respond(HeaderMap::new())
            });
        };
        let mut out = HeaderMap::new();
        out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.allow_credentials == Some(true) {
            out.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        for (name, v) in [
            (ACCESS_CONTROL_ALLOW_METHODS, &self.allow_methods),
            (ACCESS_CONTROL_ALLOW_HEADERS, &self.allow_headers),
        ] {
            if let Some(v) = Some(v).filter(|v| !v.is_empty()).and_then(|v| value(v)) {
                out.insert(name, v);
            }
        }
        if let Some(age) = self.max_age {
            out.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from(age));
        }
        Some(Preflight::Respond(out))
    }

    /// Headers to add to the response of an actual (non-preflight) request; empty when the
    /// request has no allowed `Origin`.
    pub fn response_headers(&self, request_headers: &HeaderMap) -> HeaderMap {
        let mut out = HeaderMap::new();
        let Some(origin) = self.allowed_origin(request_headers) else {
            return out;
        };
        out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.allow_credentials == Some(true) {
            out.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = Some(&self.expose_headers)
            .filter(|v| !v.is_empty())
            .and_then(|v| value(v))
        {
            out.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn policy(origins: Vec<StrMatch>) -> CorsPolicy {
        CorsPolicy {
            allow_origins: origins,
            allow_methods: "GET,POST".into(),
            allow_headers: "x-token".into(),
            expose_headers: "x-trace".into(),
            max_age: Some(86400),
            allow_credentials: Some(true),
            forward_unmatched_preflights: true,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn origins_match_exact_prefix_and_regex() {
        let p = policy(vec![
            StrMatch::Exact("https://a.example".into()),
            StrMatch::Prefix("http://localhost:".into()),
            StrMatch::Regex(Regex::new(r"^(?:https://[a-z]+\.b\.example)$").expect("re")),
        ]);
        assert!(p.origin_allowed("https://a.example"));
        assert!(!p.origin_allowed("https://a.example.evil"));
        assert!(p.origin_allowed("http://localhost:3000"));
        assert!(p.origin_allowed("https://x.b.example"));
        assert!(
            !p.origin_allowed("https://x.b.example.evil"),
            "regex is anchored"
        );
        assert!(!p.origin_allowed("https://c.example"));
    }

    #[test]
    fn star_allows_every_origin() {
        let p = policy(vec![StrMatch::Exact("*".into())]);
        assert!(p.origin_allowed("https://anything.example"));
    }

    #[test]
    fn preflight_from_allowed_origin_is_answered() {
        let p = policy(vec![StrMatch::Exact("https://a.example".into())]);
        let req = headers(&[
            ("origin", "https://a.example"),
            ("access-control-request-method", "POST"),
        ]);
        let Some(Preflight::Respond(h)) = p.preflight(&Method::OPTIONS, &req) else {
            panic!("expected an answer");
        };
        assert_eq!(
            h.get("access-control-allow-origin").map(|v| v.as_bytes()),
            Some(&b"https://a.example"[..])
        );
        assert_eq!(
            h.get("access-control-allow-methods").map(|v| v.as_bytes()),
            Some(&b"GET,POST"[..])
        );
        assert_eq!(
            h.get("access-control-allow-headers").map(|v| v.as_bytes()),
            Some(&b"x-token"[..])
        );
        assert_eq!(
            h.get("access-control-max-age").map(|v| v.as_bytes()),
            Some(&b"86400"[..])
        );
        assert_eq!(
            h.get("access-control-allow-credentials")
                .map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
    }

    #[test]
    fn preflight_from_other_origin_is_forwarded_or_ignored() {
        let mut p = policy(vec![StrMatch::Exact("https://a.example".into())]);
        let req = headers(&[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "GET"),
        ]);
        assert_eq!(
            p.preflight(&Method::OPTIONS, &req),
            Some(Preflight::Forward)
        );
        p.forward_unmatched_preflights = false;
        assert_eq!(
            p.preflight(&Method::OPTIONS, &req),
            Some(Preflight::Respond(HeaderMap::new()))
        );
        assert_eq!(p.preflight(&Method::GET, &req), None, "not a preflight");
        assert_eq!(
            p.preflight(&Method::OPTIONS, &headers(&[("origin", "x")])),
            None
        );
    }

    #[test]
    fn actual_responses_get_origin_and_expose_headers() {
        let p = policy(vec![StrMatch::Prefix("https://".into())]);
        let h = p.response_headers(&headers(&[("origin", "https://a.example")]));
        assert_eq!(
            h.get("access-control-allow-origin").map(|v| v.as_bytes()),
            Some(&b"https://a.example"[..])
        );
        assert_eq!(
            h.get("access-control-expose-headers").map(|v| v.as_bytes()),
            Some(&b"x-trace"[..])
        );
        assert!(p
            .response_headers(&headers(&[("origin", "http://plain.example")]))
            .is_empty());
        assert!(p.response_headers(&HeaderMap::new()).is_empty());
    }
}
