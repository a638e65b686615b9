//! Compiles parsed VirtualService / DestinationRule / ServiceEntry documents into an
//! [`L7Config`]: DestinationRules and ServiceEntries are validated and indexed by host; each
//! VirtualService is compiled route by route (short hosts resolved in its namespace, subsets
//! checked against the DestinationRule of their host, weights checked, regexes compiled
//! anchored `^(?:…)$`, delegates merged) and its routes are entered into the table of every
//! (gateway, host) it binds. A resource that fails any check is left out and reported as a
//! [`Rejected`] naming the resource and the field; everything else still applies.

use super::destination_rule::{self, DestinationPolicy, DestinationRuleSpec};
use super::route::{RouteTable, RouteTables, MESH_GATEWAY};
use super::service_entry::{self, ServiceEntry, ServiceEntrySpec};
use super::virtual_service::VirtualServiceSpec;
use super::vs_compile::{compile_virtual_service, merge_delegate, CompiledVs, Ctx, RouteEntry};
use super::{L7Config, L7Policy};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The DNS domain of Kubernetes services (`<name>.<ns>.svc.<domain>`).
pub const DEFAULT_DOMAIN_SUFFIX: &str = "cluster.local";

/// A parsed resource with its identity and the document it came from.
#[derive(Debug, Clone)]
pub struct Named<S> {
    pub name: String,
    pub namespace: String,
    /// 1-based document index in its file (0 when not from a file).
    pub document: usize,
    /// `metadata.labels` (a ServiceEntry's `istio.io/use-waypoint` binds it to a waypoint).
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    pub spec: S,
}

/// Everything the compiler takes.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub virtual_services: Vec<Named<VirtualServiceSpec>>,
    pub destination_rules: Vec<Named<DestinationRuleSpec>>,
    pub service_entries: Vec<Named<ServiceEntrySpec>>,
    /// Already compiled (their errors are fatal to the load, like every L4 kind).
    pub authorization_policies: Vec<Arc<L7Policy>>,
    /// AuthorizationPolicies attached to waypoints (`targetRefs`).
    pub attached_policies: Vec<Arc<super::attached::AttachedPolicy>>,
    /// DestinationRules rejected before compilation (`spec` = the host as written), so that
    /// VirtualServices using their subsets can say why the subsets are missing.
    pub rejected_destination_rules: Vec<Named<String>>,
}

/// A resource left out of the configuration, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub kind: &'static str,
    pub name: String,
    pub namespace: String,
    pub document: usize,
    /// Path of the offending field (`spec.http[0].route[1].weight`); empty for the whole
    /// resource.
    pub field: String,
    pub message: String,
}

impl Rejected {
    /// `<Kind> <ns>/<name>`.
    pub fn resource(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.resource())?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Resolves a host as Istio does: a name without dots is short for
/// `<name>.<namespace>.svc.<domain>`; `*`, IPs and dotted names are taken as written.
/// Lower-cased, trailing dot removed.
pub fn resolve_host(host: &str, namespace: &str, domain: &str) -> String {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    if h == "*" || h.contains('.') || h.contains(':') || h.is_empty() {
        h
    } else {
        format!("{h}.{namespace}.svc.{domain}")
    }
}

/// Whether `host` falls under `pattern`: `*` is everything, `*.example.com` any name ending in
/// `.example.com` (any depth), otherwise equal (ASCII case-insensitive).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => {
            host.len() > suffix.len()
                && host
                    .get(host.len() - suffix.len()..)
                    .is_some_and(|t| t.eq_ignore_ascii_case(suffix))
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// DestinationRules by host, plus the hosts whose rule was rejected (for error messages).
#[derive(Debug, Default)]
pub(crate) struct DrIndex {
    pub by_host: BTreeMap<String, Vec<Arc<DestinationPolicy>>>,
    pub rejected: BTreeMap<String, String>,
}

impl DrIndex {
    /// The rule a proxy in `viewer` uses for `host` ([`lookup_rule`]).
    pub fn lookup(&self, host: &str, viewer: &str) -> Option<&Arc<DestinationPolicy>> {
        lookup_rule(&self.by_host, host, viewer)
    }
}

/// The DestinationRule a proxy in namespace `viewer` uses for `host`: among the rules exported
/// to `viewer`, an exact host first, else the most specific wildcard; of several for one host,
/// `viewer`'s own, then the one in the host's namespace, then the first.
pub(crate) fn lookup_rule<'m>(
    by_host: &'m BTreeMap<String, Vec<Arc<DestinationPolicy>>>,
    host: &str,
    viewer: &str,
) -> Option<&'m Arc<DestinationPolicy>> {
    let preferred = super::export::host_namespace(host);
    let pick =
        |rules: &'m Vec<Arc<DestinationPolicy>>| super::export::choose(rules, viewer, preferred);
    if let Some(r) = by_host.get(host).and_then(pick) {
        return Some(r);
    }
    let mut wildcards: Vec<(&String, &'m Vec<Arc<DestinationPolicy>>)> = by_host
        .iter()
        .filter(|(p, _)| p.starts_with('*') && host_matches(p, host))
        .collect();
    wildcards.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    wildcards.into_iter().find_map(|(_, rules)| pick(rules))
}

/// Rejects the second and later resources with the same namespace/name.
fn dedupe<S>(
    kind: &'static str,
    items: Vec<Named<S>>,
    rejected: &mut Vec<Rejected>,
) -> Vec<Named<S>> {
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let key = (item.namespace.clone(), item.name.clone());
        if let Some(first) = seen.get(&key) {
            rejected.push(Rejected {
                kind,
                name: item.name,
                namespace: item.namespace,
                document: item.document,
                field: "metadata.name".into(),
                message: format!(
                    "{kind} {}/{} is already defined (document {first})",
                    key.0, key.1
                ),
            });
            continue;
        }
        seen.insert(key, item.document);
        out.push(item);
    }
    out
}

fn reject<S>(kind: &'static str, item: &Named<S>, (field, message): (String, String)) -> Rejected {
    Rejected {
        kind,
        name: item.name.clone(),
        namespace: item.namespace.clone(),
        document: item.document,
        field,
        message,
    }
}

/// Compiles everything; rejected resources are left out and listed.
pub fn compile(res: Resources, domain: &str) -> (L7Config, Vec<Rejected>) {
    let mut rejected = Vec::new();
    let mut warnings = Vec::new();

    // DestinationRules first: VirtualServices check their subsets against them.
    let mut drs = DrIndex::default();
    for r in &res.rejected_destination_rules {
        let label = format!("DestinationRule {}/{}", r.namespace, r.name);
        drs.rejected
            .entry(resolve_host(&r.spec, &r.namespace, domain))
            .or_insert(label);
    }
    for dr in dedupe("DestinationRule", res.destination_rules, &mut rejected) {
        let host = resolve_host(&dr.spec.host, &dr.namespace, domain);
        let label = format!("DestinationRule {}/{}", dr.namespace, dr.name);
        let same_ns = drs
            .by_host
            .get(&host)
            .and_then(|rules| rules.iter().find(|r| r.namespace == dr.namespace));
        let checked = destination_rule::validate(&dr.spec).and_then(|()| match same_ns {
            Some(first) => Err((
                "spec.host".into(),
                format!(
                    "host {host} already has DestinationRule {}/{} in this namespace (one rule per host and namespace)",
                    first.namespace, first.name
                ),
            )),
            None => Ok(()),
        });
        if let Err(e) = checked {
            drs.rejected.entry(host).or_insert(label);
            rejected.push(reject("DestinationRule", &dr, e));
            continue;
        }
        for field in destination_rule::ignored_fields(&dr.spec) {
            warnings.push(format!(
                "DestinationRule {}/{}: {field} is accepted but not applied by this data plane",
                dr.namespace, dr.name
            ));
        }
        let policy = DestinationPolicy {
            name: dr.name,
            namespace: dr.namespace,
            host: host.clone(),
            traffic_policy: dr.spec.traffic_policy,
            subsets: dr.spec.subsets,
            export_to: dr.spec.export_to,
        };
        drs.by_host.entry(host).or_default().push(Arc::new(policy));
    }

    let mut service_entries = Vec::new();
    for se in dedupe("ServiceEntry", res.service_entries, &mut rejected) {
        match service_entry::validate(&se.spec) {
            Ok(()) => service_entries.push(Arc::new(ServiceEntry {
                name: se.name,
                namespace: se.namespace,
                spec: se.spec,
                document: se.document,
                labels: se.labels,
                annotations: se.annotations,
            })),
            Err(e) => rejected.push(reject("ServiceEntry", &se, e)),
        }
    }

    // VirtualServices, standalone.
    let vss = dedupe("VirtualService", res.virtual_services, &mut rejected);
    let mut compiled: Vec<(usize, CompiledVs)> = Vec::new();
    for (i, vs) in vss.iter().enumerate() {
        let ctx = Ctx {
            namespace: &vs.namespace,
            domain,
            drs: &drs,
        };
        match compile_virtual_service(&vs.spec, &ctx) {
            Ok(c) => compiled.push((i, c)),
            Err(e) => rejected.push(reject("VirtualService", vs, e)),
        }
    }

    // Delegates: replace each delegate route of a root by the delegate's routes.
    let by_key: HashMap<(String, String), usize> = compiled
        .iter()
        .enumerate()
        .map(|(ci, (i, _))| ((vss[*i].namespace.clone(), vss[*i].name.clone()), ci))
        .collect();
    let mut tables: Vec<(usize, CompiledVs)> = Vec::new();
    for (i, c) in &compiled {
        if c.hosts.is_empty() {
            continue; // a delegate: used through its roots only
        }
        let vs = &vss[*i];
        let mut out = c.clone();
        out.http.clear();
        let mut failed = None;
        for (r, entry) in c.http.iter().enumerate() {
            match entry {
                RouteEntry::Route(route) => out.http.push(RouteEntry::Route(route.clone())),
                RouteEntry::Delegate {
                    name,
                    namespace,
                    matches,
                } => {
                    let target = by_key
                        .get(&(namespace.clone(), name.clone()))
                        .map(|ci| &compiled[*ci]);
                    let Some((ti, target)) = target else {
                        warnings.push(format!(
                            "VirtualService {}/{}: spec.http[{r}].delegate: VirtualService {namespace}/{name} does not exist or was rejected; the route is skipped",
                            vs.namespace, vs.name
                        ));
                        continue;
                    };
                    if !target.hosts.is_empty() {
                        warnings.push(format!(
                            "VirtualService {}/{}: spec.http[{r}].delegate: VirtualService {namespace}/{name} has hosts, so it cannot be a delegate; the route is skipped",
                            vs.namespace, vs.name
                        ));
                        continue;
                    }
                    let dvs = &vss[*ti];
                    let ctx = Ctx {
                        namespace: &dvs.namespace,
                        domain,
                        drs: &drs,
                    };
                    match merge_delegate(&vs.spec.http[r], matches, &dvs.spec, &ctx) {
                        Ok(routes) => out
                            .http
                            .extend(routes.into_iter().map(|r| RouteEntry::Route(Box::new(r)))),
                        Err((field, message)) => {
                            failed = Some((
                                format!("spec.http[{r}].delegate"),
                                format!("merging delegate {namespace}/{name}: {field}: {message}"),
                            ));
                            break;
                        }
                    }
                }
            }
        }
        match failed {
            Some(e) => rejected.push(reject("VirtualService", vs, e)),
            None => tables.push((*i, out)),
        }
    }

    // Route tables per (gateway, host), in file order. Within one namespace the first
    // VirtualService for a host wins; across namespaces `exportTo` decides per proxy.
    let mut routes = RouteTables::default();
    for (i, c) in tables {
        let vs = &vss[i];
        let key = format!("{}/{}", vs.namespace, vs.name);
        for gw in &c.gateways {
            let Some(table) = c.table_for(gw, &key, &vs.namespace) else {
                continue;
            };
            let table = Arc::new(table);
            let hosts = routes.gateways.entry(gw.clone()).or_default();
            for host in &c.hosts {
                let tables = hosts.entry(host.clone()).or_default();
                match tables.iter().find(|t| t.namespace == vs.namespace) {
                    Some(first) => warnings.push(format!(
                        "VirtualService {key}: host {host} on gateway {gw} is already routed by VirtualService {} in the same namespace; ignored for that host",
                        first.virtual_service
                    )),
                    None => tables.push(table.clone()),
                }
            }
        }
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let authorization_policies = res
        .authorization_policies
        .into_iter()
        .map(|p| (format!("{}/{}", p.namespace, p.name), p))
        .collect();
    let config = L7Config {
        routes,
        destination_rules: drs.by_host,
        service_entries,
        authorization_policies,
        attached_policies: res.attached_policies,
        warnings,
    };
    (config, rejected)
}

impl CompiledVs {
    /// The table this VirtualService contributes on `gateway`: match blocks bound to other
    /// gateways are dropped, and routes left without match blocks with them. `None` when
    /// nothing is left.
    fn table_for(&self, gateway: &str, key: &str, namespace: &str) -> Option<RouteTable> {
        let keep = |gws: &Vec<String>| gws.is_empty() || gws.iter().any(|g| g == gateway);
        let mut http = Vec::new();
        for entry in &self.http {
            let RouteEntry::Route(route) = entry else {
                continue;
            };
            if route.0.matches.is_empty() {
                http.push(route.0.clone());
                continue;
            }
            let mut r = route.0.clone();
            r.matches = route
                .0
                .matches
                .iter()
                .zip(&route.1)
                .filter(|(_, gws)| keep(gws))
                .map(|(m, _)| m.clone())
                .collect();
            if !r.matches.is_empty() {
                http.push(r);
            }
        }
        let l4 = |routes: &Vec<(super::route::L4Route, Vec<Vec<String>>)>| {
            routes
                .iter()
                .filter_map(|(r, gws)| {
                    if r.matches.is_empty() {
                        return Some(r.clone());
                    }
                    let mut r = r.clone();
                    r.matches = r
                        .matches
                        .iter()
                        .zip(gws)
                        .filter(|(_, g)| keep(g))
                        .map(|(m, _)| m.clone())
                        .collect();
                    (!r.matches.is_empty()).then_some(r)
                })
                .collect::<Vec<_>>()
        };
        let (tcp, tls) = (l4(&self.tcp), l4(&self.tls));
        if http.is_empty() && tcp.is_empty() && tls.is_empty() {
            return None;
        }
        Some(RouteTable {
            virtual_service: key.to_string(),
            namespace: namespace.to_string(),
            hosts: self.hosts.clone(),
            http,
            tcp,
            tls,
            export_to: self.export_to.clone(),
        })
    }
}

/// Normalises a gateway reference: `mesh` stays, `<name>` means `<namespace>/<name>`.
pub(crate) fn gateway_name(gw: &str, namespace: &str) -> String {
    if gw == MESH_GATEWAY || gw.contains('/') {
        gw.to_string()
    } else {
        format!("{namespace}/{gw}")
    }
}
