//! `exportTo`: which proxies see a VirtualService or DestinationRule, and which of several
//! resources for one host a proxy uses.
//!
//! Istio's rule, applied to the waypoint as "the proxy": a resource is visible to a proxy in
//! namespace `viewer` when its `exportTo` is empty (the mesh default `*`), contains `*`, contains
//! `.` and the resource lives in `viewer`, or names `viewer`; `~` exports to nobody. Of several
//! visible resources for the same host, the one in the proxy's own namespace wins, then (for
//! DestinationRules) the one in the host's namespace, then configuration order.

use std::sync::Arc;

/// A namespaced resource with an `exportTo` list.
pub trait Exported {
    fn namespace(&self) -> &str;
    fn export_to(&self) -> &[String];
}

/// Whether a resource in `owner` with `export_to` is visible to a proxy in `viewer`.
pub fn visible(export_to: &[String], owner: &str, viewer: &str) -> bool {
    export_to.is_empty()
        || export_to.iter().any(|e| match e.as_str() {
            "*" => true,
            "." => owner == viewer,
            "~" => false,
            ns => ns == viewer,
        })
}

/// Checks an `exportTo` list: each entry is `*`, `.`, `~` or a namespace name, and `*` / `~`
/// stand alone. Returns the index and message of the first bad entry.
pub fn validate(export_to: &[String]) -> Result<(), (usize, String)> {
    for (i, e) in export_to.iter().enumerate() {
        match e.as_str() {
            "*" | "~" if export_to.len() > 1 => {
                return Err((i, format!("{e:?} must be the only entry")));
            }
            "*" | "~" | "." => {}
            ns if is_namespace_name(ns) => {}
            ns => {
                return Err((
                    i,
                    format!("{ns:?} is not \"*\", \".\", \"~\" or a namespace name"),
                ))
            }
        }
    }
    Ok(())
}

/// A DNS-1123 label, as Kubernetes namespace names are.
fn is_namespace_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The candidate (in configuration order) a proxy in `viewer` uses: visible ones only; its own
/// namespace's first, then `preferred`'s, then the first visible.
pub fn choose<'a, T: Exported>(
    candidates: &'a [Arc<T>],
    viewer: &str,
    preferred: Option<&str>,
) -> Option<&'a Arc<T>> {
    let mut visible_ones = candidates
        .iter()
        .filter(|c| visible(c.export_to(), c.namespace(), viewer));
    let first = visible_ones.next()?;
    if candidates.len() == 1 {
        return Some(first);
    }
    let in_ns = |ns: &str| {
        candidates
            .iter()
            .find(|c| c.namespace() == ns && visible(c.export_to(), c.namespace(), viewer))
    };
    in_ns(viewer)
        .or_else(|| preferred.and_then(in_ns))
        .or(Some(first))
}

/// The namespace a service FQDN names (`<name>.<ns>.svc.<domain>`), if it is one.
pub fn host_namespace(host: &str) -> Option<&str> {
    let mut labels = host.split('.');
    let (_, ns, svc) = (labels.next()?, labels.next()?, labels.next()?);
    (svc == "svc").then_some(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct R(&'static str, Vec<String>);
    impl Exported for R {
        fn namespace(&self) -> &str {
            self.0
        }
        fn export_to(&self) -> &[String] {
            &self.1
        }
    }
    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn visibility_follows_istio_rules() {
        assert!(visible(&[], "a", "b"), "empty exports everywhere");
        assert!(visible(&v(&["*"]), "a", "b"));
        assert!(visible(&v(&["."]), "a", "a"));
        assert!(!visible(&v(&["."]), "a", "b"));
        assert!(!visible(&v(&["~"]), "a", "a"));
        assert!(visible(&v(&[".", "b"]), "a", "b"));
        assert!(!visible(&v(&[".", "b"]), "a", "c"));
    }

    #[test]
    fn validation_names_the_bad_entry() {
        assert!(validate(&v(&[".", "team-a"])).is_ok());
        assert_eq!(validate(&v(&[".", "*"])).unwrap_err().0, 1);
        assert_eq!(validate(&v(&["~", "a"])).unwrap_err().0, 0);
        let (i, m) = validate(&v(&["ok", "Bad_NS"])).unwrap_err();
        assert_eq!(i, 1);
        assert!(m.contains("Bad_NS"), "{m}");
    }

    #[test]
    fn own_namespace_then_preferred_then_order() {
        let c = vec![
            Arc::new(R("x", vec![])),
            Arc::new(R("svc-ns", vec![])),
            Arc::new(R("proxy-ns", vec![])),
            Arc::new(R("private", v(&["."]))),
        ];
        assert_eq!(
            choose(&c, "proxy-ns", Some("svc-ns")).unwrap().0,
            "proxy-ns"
        );
        assert_eq!(choose(&c, "other", Some("svc-ns")).unwrap().0, "svc-ns");
        assert_eq!(choose(&c, "other", None).unwrap().0, "x");
        assert_eq!(choose(&c, "private", None).unwrap().0, "private");
        let only_private = vec![Arc::new(R("private", v(&["."])))];
        assert!(choose(&only_private, "other", None).is_none());
    }

    #[test]
    fn host_namespace_of_service_fqdns() {
        assert_eq!(
            host_namespace("reviews.prod.svc.cluster.local"),
            Some("prod")
        );
        assert_eq!(host_namespace("www.example.com"), None);
        assert_eq!(host_namespace("*.prod.svc.cluster.local"), Some("prod"));
    }
}
