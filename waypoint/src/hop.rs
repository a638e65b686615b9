//! Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, so a proxy removes them
//! (and every header the `connection` header names) before passing a message on. Upgrades are
//! the exception: `connection: upgrade` and `upgrade` travel with the request and its 101.
//! So is `te: trailers`, which Envoy keeps (dropping any other `te` value): gRPC needs it end
//! to end, and some gRPC servers reject calls without it.
//!
//! `Upgrade: h2c` (RFC 7540 §3.2, what `curl --http2` sends on a cleartext URL) is not passed
//! on: like Envoy, the waypoint serves such a request as plain HTTP/1.1 and removes the `h2c`
//! token with its `HTTP2-Settings` header. Forwarding it would let a backend that accepts the
//! upgrade answer 101 and switch the upstream connection to HTTP/2 in the middle of a request
//! the waypoint is proxying as HTTP/1.1 (the client got an empty reply).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    // Only meaningful with `upgrade: h2c`, which is never forwarded.
    "http2-settings",
];

/// The protocol a message asks to upgrade to (`connection: upgrade` + `upgrade: <proto>`),
/// without `h2c`; `None` when nothing else is left.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let protocols: Vec<&str> = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.eq_ignore_ascii_case("h2c"))
        .collect();
    if protocols.is_empty() {
        return None;
    }
    HeaderValue::from_str(&protocols.join(", ")).ok()
}

/// Whether the `te` headers accept trailers (`te: trailers`, possibly among other codings).
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| t.split(';').next())
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// Removes hop-by-hop headers; with `upgrade` set, re-adds `connection: upgrade` and
/// `upgrade: <proto>` so the upgrade handshake reaches the other side. A `te` that accepts
/// trailers is kept as `te: trailers`.
pub fn strip(headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    let trailers = accepts_trailers(headers);
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    if let Some(proto) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-hop-secret"),
            ("x-hop-secret", "no"),
            ("keep-alive", "timeout=30"),
            ("proxy-connection", "keep-alive"),
            ("x-end-to-end", "yes"),
        ]);
        strip(&mut h, None);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-end-to-end"], "yes");
    }

    #[test]
    fn keeps_te_trailers_and_drops_other_te_values() {
        let mut h = map(&[("te", "trailers"), ("content-type", "application/grpc")]);
        strip(&mut h, None);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h.len(), 2);
        // HTTP/1.1 lists `te` in `connection`; still kept, other codings dropped.
        let mut h = map(&[("connection", "TE"), ("te", "gzip;q=0.5, Trailers")]);
        strip(&mut h, None);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h.get_all("te").iter().count(), 1);
        assert!(h.get("connection").is_none());
        for other in ["gzip", "deflate;q=0.5, chunked", "trailersx"] {
            let mut h = map(&[("te", other)]);
            strip(&mut h, None);
            assert!(h.is_empty(), "te: {other} kept");
        }
    }

    #[test]
    fn keeps_the_upgrade_handshake() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        let proto = upgrade_protocol(&h);
        assert_eq!(
            proto.as_ref().map(|v| v.to_str().unwrap()),
            Some("websocket")
        );
        strip(&mut h, proto);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(upgrade_protocol(&map(&[("upgrade", "websocket")])).is_none());
    }

    #[test]
    fn h2c_upgrade_is_served_as_http11() {
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
            ("accept", "*/*"),
        ]);
        let proto = upgrade_protocol(&h);
        assert!(proto.is_none());
        strip(&mut h, proto);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["accept"], "*/*");
        // `http2-settings` alone (not named in `connection`) is dropped as well.
        let mut h = map(&[("http2-settings", "AAMAAABk")]);
        strip(&mut h, None);
        assert!(h.is_empty());
        // Another protocol offered beside h2c still upgrades, without h2c.
        let h = map(&[("connection", "upgrade"), ("upgrade", "H2C, websocket")]);
        assert_eq!(upgrade_protocol(&h).unwrap(), "websocket");
    }
}
