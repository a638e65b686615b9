//! The L7 model and routing engine the waypoint uses: Istio `VirtualService`,
//! `DestinationRule` and `ServiceEntry` as users write them ([`virtual_service`],
//! [`destination_rule`], [`service_entry`]), compiled ([`compile`]) into per-gateway, per-host
//! [`RouteTables`] of routes with every regex, header name and action validated; request
//! matching ([`matching`]), destination and endpoint choice ([`select`]), rewrites, redirects
//! and header operations ([`rewrite`]), retries/faults/mirrors ([`actions`]), CORS ([`cors`])
//! and L7 AuthorizationPolicy ([`policy`]). Pure logic: no sockets.
//!
//! # Rejection rule
//! The configuration loader compiles these kinds per resource: a VirtualService,
//! DestinationRule or ServiceEntry that fails to parse (unknown field, wrong type, bad duration)
//! or to compile (bad regex, weights not summing to 100, unknown subset, duplicate name, a second
//! DestinationRule for a host in one namespace, a bad `exportTo`…) is left out, logged, and listed in `Snapshot::rejected` with its
//! resource and field; every other resource of the file still applies. A VirtualService that
//! names a subset of a rejected DestinationRule is rejected in turn (its message says so).
//! Conflicts that do not make a resource wrong (two VirtualServices for one host in one
//! namespace: the first in file order wins; a delegate that does not exist: the route is skipped) are
//! [`L7Config::warnings`]. The security kinds (AuthorizationPolicy, PeerAuthentication,
//! Sidecar) are rejected one by one as well, but replaced by fail-closed stand-ins (see
//! `config::reject`).
//!
//! # Life of a request (what the waypoint does with this module)
//! `routes.mesh(service hostname, waypoint namespace)` (the table exported to the waypoint's
//! namespace, [`export`]) → no table: forward to the service; else
//! `table.match_http(&request)` → none: 404; else per the route's action: redirect / direct
//! response, or fault → [`select::pick_weighted`] → the DestinationRule's
//! [`destination_rule::DestinationPolicy::effective`] policy → [`select::subset_endpoints`] →
//! a [`select::Picker`] → rewrite and header operations → forward with the route's timeout and
//! retry policy.

pub mod actions;
pub mod attached;
pub mod compile;
mod compile_match;
pub mod cors;
pub mod destination_rule;
pub mod export;
pub mod matching;
pub mod path;
pub mod policy;
pub mod rewrite;
pub mod route;
pub mod select;
pub mod service_entry;
pub mod spec;
pub mod virtual_service;
mod vs_compile;

pub use compile::{compile, resolve_host, Named, Rejected, Resources, DEFAULT_DOMAIN_SUFFIX};
pub use destination_rule::{DestinationPolicy, EffectivePolicy, LbPolicy};
pub use matching::{HttpMatch, L4Info, RequestInfo, NO_ROUTE_STATUS};
pub use policy::L7Policy;
pub use route::{HttpRoute, RouteTable, RouteTables, MESH_GATEWAY};
pub use service_entry::ServiceEntry;

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Everything L7 in one snapshot: route tables, DestinationRules and ServiceEntries by host,
/// L7 authorization policies by `<ns>/<name>`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L7Config {
    pub routes: RouteTables,
    /// By resolved host (FQDN or wildcard); several for one host come from different
    /// namespaces, in configuration order ([`export`] picks per proxy).
    pub destination_rules: BTreeMap<String, Vec<Arc<DestinationPolicy>>>,
    pub service_entries: Vec<Arc<ServiceEntry>>,
    pub authorization_policies: BTreeMap<String, Arc<L7Policy>>,
    /// Policies attached to waypoints with `targetRefs` (only waypoints evaluate them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attached_policies: Vec<Arc<attached::AttachedPolicy>>,
    /// Conflicts resolved by a rule rather than by rejecting a resource.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl L7Config {
    /// The DestinationRule a proxy in namespace `viewer` uses for `host`: exported to `viewer`,
    /// exact host first, else the most specific wildcard rule.
    pub fn destination_rule(&self, host: &str, viewer: &str) -> Option<&Arc<DestinationPolicy>> {
        compile::lookup_rule(&self.destination_rules, &host.to_ascii_lowercase(), viewer)
    }

    /// The policy in force for a destination as seen from `viewer` (defaults when no
    /// DestinationRule applies).
    pub fn effective_policy(
        &self,
        host: &str,
        viewer: &str,
        subset: Option<&str>,
        port: u16,
    ) -> EffectivePolicy {
        self.destination_rule(host, viewer)
            .map(|dr| dr.effective(subset, port))
            .unwrap_or_default()
    }

    /// The labels of `subset` of `host`'s DestinationRule as seen from `viewer`.
    pub fn subset_labels(
        &self,
        host: &str,
        viewer: &str,
        subset: &str,
    ) -> Option<&BTreeMap<String, String>> {
        self.destination_rule(host, viewer)?
            .subset(subset)
            .map(|s| &s.labels)
    }
}

/// Serialisers for types without serde support.
mod ser {
    use http::{HeaderName, HeaderValue};
    use serde::ser::{SerializeMap, SerializeSeq, Serializer};

    pub fn regex<S: Serializer>(r: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(r.as_str())
    }

    pub fn header_name<S: Serializer>(h: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(h.as_str())
    }

    pub fn header_names<S: Serializer>(v: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for h in v {
            seq.serialize_element(h.as_str())?;
        }
        seq.end()
    }

    pub fn header_pairs<S: Serializer>(
        v: &[(HeaderName, HeaderValue)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(v.len()))?;
        for (k, val) in v {
            m.serialize_entry(k.as_str(), &String::from_utf8_lossy(val.as_bytes()))?;
        }
        m.end()
    }
}

#[cfg(test)]
mod export_tests;
#[cfg(test)]
mod loader_tests;
#[cfg(test)]
mod tests;
