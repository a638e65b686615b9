//! The compiled routing model the waypoint evaluates: [`RouteTables`] (per gateway, per host) of
//! [`RouteTable`]s (one VirtualService's `http`/`tcp`/`tls` routes with hosts resolved), with
//! regexes compiled and anchored, header names parsed and actions validated. Everything is
//! `Serialize` for `/config_dump`.

use super::actions::{Fault, Mirror, RetryPolicy};
use super::cors::CorsPolicy;
use super::rewrite::{HeaderOps, Redirect, Rewrite};
use super::spec::Duration;
use http::HeaderName;
use regex::Regex;
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The gateway name of sidecars and waypoints (a VirtualService without `gateways` binds to it).
pub const MESH_GATEWAY: &str = "mesh";

/// A compiled string condition.
#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    /// Anchored `^(?:…)$`: Istio regexes must match the whole value.
    Regex(Regex),
    /// `{}` (or regex `"*"`): the value only has to be present.
    Present,
}

impl StrMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(e) => value == e,
            StrMatch::Prefix(p) => value.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(value),
            StrMatch::Present => true,
        }
    }

    /// `exact` and `prefix` compare ASCII case-insensitively (`ignoreUriCase`); regexes are
    /// unaffected, as in Istio.
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(e) => value.eq_ignore_ascii_case(e),
            StrMatch::Prefix(p) => value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            other => other.matches(value),
        }
    }
}

impl Serialize for StrMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        match self {
            StrMatch::Exact(v) => m.serialize_entry("exact", v)?,
            StrMatch::Prefix(v) => m.serialize_entry("prefix", v)?,
            StrMatch::Regex(r) => m.serialize_entry("regex", r.as_str())?,
            StrMatch::Present => m.serialize_entry("present", &true)?,
        }
        m.end()
    }
}

/// A header condition (`headers` / `withoutHeaders`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderCondition {
    #[serde(serialize_with = "super::ser::header_name")]
    pub name: HeaderName,
    pub matcher: StrMatch,
}

/// A query parameter condition (`queryParams`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryCondition {
    pub name: String,
    pub matcher: StrMatch,
}

/// One `match` block: every condition set must hold.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<StrMatch>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StrMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<StrMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<StrMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderCondition>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub without_headers: Vec<HeaderCondition>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<QueryCondition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// For routes brought in by `delegate`: the root route's match block, which must hold too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<Arc<RouteMatch>>,
}

impl RouteMatch {
    /// The uri condition that decided the match (this block's, else its delegate parent's), for
    /// prefix rewriting.
    pub fn effective_uri(&self) -> Option<&StrMatch> {
        self.uri
            .as_ref()
            .or_else(|| self.parent.as_deref().and_then(RouteMatch::effective_uri))
    }
}

/// Where traffic goes: a host (FQDN), optionally a DestinationRule subset and a port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A destination with its share of traffic (weights of a route sum to 100) and its own header
/// operations.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedDestination {
    pub destination: Destination,
    pub weight: u32,
    #[serde(skip_serializing_if = "HeaderOps::is_empty")]
    pub headers: HeaderOps,
}

/// What a matched HTTP route does.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RouteAction {
    Forward(Vec<WeightedDestination>),
    Redirect(Redirect),
    DirectResponse { status: u16, body: Option<String> },
}

/// One compiled `http` route.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// OR of match blocks; empty matches every request.
    pub matches: Vec<RouteMatch>,
    pub action: RouteAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    #[serde(skip_serializing_if = "HeaderOps::is_empty")]
    pub headers: HeaderOps,
    /// `None`: no timeout (Istio's default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// `None`: retries disabled (`attempts: 0`); unset in the spec gives Istio's default policy.
    pub retries: Option<RetryPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsPolicy>,
}

/// A match block of a `tcp` or `tls` route.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<ipnet::IpNet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// TLS routes only: SNI patterns (`*.example.com` allowed), lower-cased.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sni_hosts: Vec<String>,
}

/// A compiled `tcp` or `tls` route.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Route {
    pub matches: Vec<L4Match>,
    pub destinations: Vec<WeightedDestination>,
}

/// The compiled routes of one VirtualService (shared by all of its hosts).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTable {
    /// `<namespace>/<name>` of the VirtualService.
    pub virtual_service: String,
    #[serde(skip)]
    pub namespace: String,
    pub hosts: Vec<String>,
    pub http: Vec<HttpRoute>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<L4Route>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<L4Route>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

/// Route tables of every gateway, keyed by gateway (`mesh`, or `<ns>/<gateway>`) then host
/// (FQDN or wildcard pattern such as `*.example.com` / `*`); several tables for one host come
/// from VirtualServices in different namespaces, in configuration order, and `exportTo` decides
/// which one a proxy uses ([`super::export`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RouteTables {
    pub gateways: BTreeMap<String, BTreeMap<String, Vec<Arc<RouteTable>>>>,
}

impl super::export::Exported for RouteTable {
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn export_to(&self) -> &[String] {
        &self.export_to
    }
}

impl RouteTables {
    /// The table a proxy in namespace `viewer` uses for `host` on `gateway`: an exact host
    /// first, else the most specific wildcard, among the tables exported to `viewer`.
    /// `None` means no VirtualService applies: route to the service itself.
    pub fn get<'t>(
        &'t self,
        gateway: &str,
        host: &str,
        viewer: &str,
    ) -> Option<&'t Arc<RouteTable>> {
        let hosts = self.gateways.get(gateway)?;
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let pick = |tables: &'t Vec<Arc<RouteTable>>| super::export::choose(tables, viewer, None);
        if let Some(t) = hosts.get(&host).and_then(pick) {
            return Some(t);
        }
        let mut wildcards: Vec<(&String, &'t Vec<Arc<RouteTable>>)> = hosts
            .iter()
            .filter(|(pattern, _)| {
                pattern.starts_with('*') && super::compile::host_matches(pattern, &host)
            })
            .collect();
        wildcards.sort_by_key(|(pattern, _)| std::cmp::Reverse(pattern.len()));
        wildcards.into_iter().find_map(|(_, tables)| pick(tables))
    }

    /// The table a waypoint in namespace `viewer` uses for `host` (gateway `mesh`).
    pub fn mesh(&self, host: &str, viewer: &str) -> Option<&Arc<RouteTable>> {
        self.get(MESH_GATEWAY, host, viewer)
    }

    pub fn is_empty(&self) -> bool {
        self.gateways.values().all(BTreeMap::is_empty)
    }
}
