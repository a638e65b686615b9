//! Compiling one VirtualService (match blocks in [`super::compile_match`]): destinations (hosts resolved, subsets checked against the DestinationRule of the
//! host), weights (100 in total when there is more than one destination), actions and their
//! exclusivity, and delegate routes merged with their root (root fields are defaults, root match
//! blocks must hold as well). Errors are `(field path, message)`.

use super::actions::{Fault, Mirror, RetryPolicy};
use super::compile::{gateway_name, resolve_host, DrIndex};
use super::compile_match::{compile_match, string_match};
use super::cors::CorsPolicy;
use super::rewrite::{
    compile_header_ops, HeaderOps, Redirect, RedirectPort, RegexRewrite, Rewrite,
};
use super::route::{
    Destination, HttpRoute, L4Match, L4Route, RouteAction, RouteMatch, StrMatch,
    WeightedDestination, MESH_GATEWAY,
};
use super::spec::Percent;
use super::virtual_service::{
    self as vs, DerivePort, Headers, HttpRouteSpec, UnmatchedPreflights, VirtualServiceSpec,
};
use regex::Regex;
use std::sync::Arc;

type E = (String, String);

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, E> {
    Err((field.into(), message.into()))
}

/// What a compilation step needs to know about its surroundings.
pub(crate) struct Ctx<'a> {
    /// The VirtualService's namespace: short hosts resolve in it.
    pub namespace: &'a str,
    pub domain: &'a str,
    pub drs: &'a DrIndex,
}

/// A compiled route with, for each of its match blocks, the gateways the block is bound to
/// (empty: the VirtualService's gateways).
pub(crate) type GatedRoute = (HttpRoute, Vec<Vec<String>>);

#[derive(Debug, Clone)]
pub(crate) enum RouteEntry {
    Route(Box<GatedRoute>),
    Delegate {
        name: String,
        namespace: String,
        matches: Vec<(RouteMatch, Vec<String>)>,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledVs {
    pub hosts: Vec<String>,
    pub gateways: Vec<String>,
    pub http: Vec<RouteEntry>,
    pub tcp: Vec<(L4Route, Vec<Vec<String>>)>,
    pub tls: Vec<(L4Route, Vec<Vec<String>>)>,
    pub export_to: Vec<String>,
}

fn destination(d: &vs::Destination, path: &str, ctx: &Ctx) -> Result<Destination, E> {
    if d.host.is_empty() {
        return err(format!("{path}.host"), "missing");
    }
    let host = resolve_host(&d.host, ctx.namespace, ctx.domain);
    let subset = d.subset.clone().filter(|s| !s.is_empty());
    if let Some(subset) = &subset {
        match ctx.drs.lookup(&host, ctx.namespace) {
            Some(dr) if dr.subset(subset).is_some() => {}
            Some(dr) => {
                let names: Vec<&str> = dr.subsets.iter().map(|s| s.name.as_str()).collect();
                return err(
                    format!("{path}.subset"),
                    format!(
                        "subset {subset:?} is not defined by DestinationRule {}/{} for host {host} (subsets: {})",
                        dr.namespace,
                        dr.name,
                        if names.is_empty() { "none".to_string() } else { names.join(", ") }
                    ),
                );
            }
            None => {
                let why = match ctx.drs.rejected.get(&host) {
                    Some(label) => format!(" ({label} was rejected)"),
                    None => String::new(),
                };
                return err(
                    format!("{path}.subset"),
                    format!(
                        "subset {subset:?} is not defined: no DestinationRule for host {host}{why}"
                    ),
                );
            }
        }
    }
    if d.port.is_some_and(|p| p.number == 0) {
        return err(format!("{path}.port.number"), "0 is not a port number");
    }
    Ok(Destination {
        host,
        subset,
        port: d.port.map(|p| p.number),
    })
}

/// Weighted destinations at `path` (`spec.http[0].route`): one destination takes everything;
/// several must have weights summing to 100.
fn weighted(
    items: &[(&vs::Destination, Option<u32>, Option<&Headers>)],
    path: &str,
    ctx: &Ctx,
) -> Result<Vec<WeightedDestination>, E> {
    if items.is_empty() {
        return err(path, "at least one destination is required");
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, (d, weight, headers)) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let headers = match headers {
            Some(h) => compile_header_ops(h, &format!("{p}.headers"))?,
            None => HeaderOps::default(),
        };
        out.push(WeightedDestination {
            destination: destination(d, &format!("{p}.destination"), ctx)?,
            weight: if items.len() == 1 {
                100
            } else {
                weight.unwrap_or(0)
            },
            headers,
        });
    }
    let sum: u64 = out.iter().map(|d| u64::from(d.weight)).sum();
    if sum != 100 {
        let parts: Vec<String> = out.iter().map(|d| d.weight.to_string()).collect();
        return err(
            path,
            format!(
                "destination weights sum to {sum} ({}); they must sum to 100",
                parts.join(" + ")
            ),
        );
    }
    Ok(out)
}

fn cors(spec: &vs::CorsPolicySpec, path: &str) -> Result<CorsPolicy, E> {
    let allow_origins = if !spec.allow_origins.is_empty() {
        spec.allow_origins
            .iter()
            .enumerate()
            .map(|(i, sm)| string_match(sm, &format!("{path}.allowOrigins[{i}]"), false))
            .collect::<Result<_, _>>()?
    } else {
        spec.allow_origin
            .iter()
            .map(|o| StrMatch::Exact(o.clone()))
            .collect()
    };
    Ok(CorsPolicy {
        allow_origins,
        allow_methods: spec.allow_methods.join(","),
        allow_headers: spec.allow_headers.join(","),
        expose_headers: spec.expose_headers.join(","),
        max_age: spec.max_age.map(|d| d.0.as_secs()),
        allow_credentials: spec.allow_credentials,
        forward_unmatched_preflights: spec.unmatched_preflights
            != Some(UnmatchedPreflights::Ignore),
    })
}

fn redirect(r: &vs::HttpRedirect, path: &str) -> Result<Redirect, E> {
    let code = r.redirect_code.unwrap_or(301);
    if !matches!(code, 301 | 302 | 303 | 307 | 308) {
        return err(
            format!("{path}.redirectCode"),
            format!("{code} is not a supported redirect code (301, 302, 303, 307, 308)"),
        );
    }
    let port = match (r.port, r.derive_port) {
        (Some(_), Some(_)) => return err(path, "set either port or derivePort, not both"),
        (Some(0), None) => return err(format!("{path}.port"), "0 is not a port number"),
        (Some(p), None) => Some(RedirectPort::Port(p)),
        (None, Some(DerivePort::FromRequestPort)) => Some(RedirectPort::FromRequest),
        (None, Some(DerivePort::FromProtocolDefault)) => Some(RedirectPort::ProtocolDefault),
        (None, None) => None,
    };
    Ok(Redirect {
        uri: r.uri.clone().filter(|u| !u.is_empty()),
        authority: r.authority.clone().filter(|a| !a.is_empty()),
        port,
        scheme: r.scheme.clone().filter(|s| !s.is_empty()),
        code,
    })
}

fn rewrite(r: &vs::HttpRewrite, path: &str) -> Result<Rewrite, E> {
    let uri = r.uri.clone().filter(|u| !u.is_empty());
    let uri_regex = match &r.uri_regex_rewrite {
        None => None,
        Some(_) if uri.is_some() => {
            return err(path, "set either uri or uriRegexRewrite, not both")
        }
        Some(rr) => {
            let p = format!("{path}.uriRegexRewrite.match");
            if rr.pattern.is_empty() {
                return err(p, "must not be empty");
            }
            let re = Regex::new(&rr.pattern).map_err(|e| {
                let detail = e.to_string();
                let last = detail.lines().last().unwrap_or("").trim().to_string();
                (p, format!("invalid regex {:?}: {last}", rr.pattern))
            })?;
            Some(RegexRewrite::new(re, rr.rewrite.clone()))
        }
    };
    Ok(Rewrite {
        uri,
        authority: r.authority.clone().filter(|a| !a.is_empty()),
        uri_regex,
    })
}

fn mirrors(r: &HttpRouteSpec, path: &str, ctx: &Ctx) -> Result<Vec<Mirror>, E> {
    let mut out = Vec::new();
    if let Some(m) = &r.mirror {
        if !r.mirrors.is_empty() {
            return err(
                format!("{path}.mirrors"),
                "set either mirror or mirrors, not both",
            );
        }
        let pct = match (r.mirror_percentage, r.mirror_percent) {
            (Some(p), _) => p,
            (None, Some(p)) => Percent {
                value: f64::from(p),
            },
            (None, None) => Percent::HUNDRED,
        };
        pct.check(&format!("{path}.mirrorPercentage"))?;
        if pct.value > 0.0 {
            out.push(Mirror {
                destination: destination(m, &format!("{path}.mirror"), ctx)?,
                percentage: pct,
            });
        }
    }
    for (i, m) in r.mirrors.iter().enumerate() {
        let p = format!("{path}.mirrors[{i}]");
        let pct = m.percentage.unwrap_or(Percent::HUNDRED);
        pct.check(&format!("{p}.percentage"))?;
        let dest = destination(&m.destination, &format!("{p}.destination"), ctx)?;
        if pct.value > 0.0 {
            out.push(Mirror {
                destination: dest,
                percentage: pct,
            });
        }
    }
    Ok(out)
}

/// Compiles one `http` route (without `delegate`) found at `path`.
pub(crate) fn http_route(r: &HttpRouteSpec, path: &str, ctx: &Ctx) -> Result<GatedRoute, E> {
    let mut matches = Vec::with_capacity(r.matches.len());
    let mut gateways = Vec::with_capacity(r.matches.len());
    for (i, m) in r.matches.iter().enumerate() {
        let (m, g) = compile_match(m, &format!("{path}.match[{i}]"), ctx.namespace)?;
        matches.push(m);
        gateways.push(g);
    }
    let action = match (r.route.as_slice(), &r.redirect, &r.direct_response) {
        ([_, ..], None, None) => {
            let items: Vec<_> = r
                .route
                .iter()
                .map(|d| (&d.destination, d.weight, d.headers.as_ref()))
                .collect();
            RouteAction::Forward(weighted(&items, &format!("{path}.route"), ctx)?)
        }
        ([], Some(rd), None) => {
            if r.rewrite.is_some() {
                return err(
                    format!("{path}.rewrite"),
                    "cannot be combined with redirect",
                );
            }
            RouteAction::Redirect(redirect(rd, &format!("{path}.redirect"))?)
        }
        ([], None, Some(dr)) => {
            let p = format!("{path}.directResponse");
            if !(200..=599).contains(&dr.status) {
                return err(
                    format!("{p}.status"),
                    format!("{} is not between 200 and 599", dr.status),
                );
            }
            let body = match &dr.body {
                Some(b) if b.bytes.is_some() => {
                    return err(format!("{p}.body.bytes"), "is not supported (use string)")
                }
                Some(b) => b.string.clone(),
                None => None,
            };
            RouteAction::DirectResponse {
                status: dr.status,
                body,
            }
        }
        ([], None, None) => {
            return err(
                path,
                "a route needs one of route, redirect, directResponse, delegate",
            )
        }
        _ => return err(path, "set only one of route, redirect, directResponse"),
    };
    let route = HttpRoute {
        name: r.name.clone().filter(|n| !n.is_empty()),
        matches,
        action,
        rewrite: r
            .rewrite
            .as_ref()
            .map(|rw| rewrite(rw, &format!("{path}.rewrite")))
            .transpose()?,
        headers: match &r.headers {
            Some(h) => compile_header_ops(h, &format!("{path}.headers"))?,
            None => HeaderOps::default(),
        },
        timeout: r.timeout.filter(|t| !t.is_zero()),
        retries: RetryPolicy::compile(r.retries.as_ref(), &format!("{path}.retries"))?,
        fault: r
            .fault
            .as_ref()
            .map(|f| Fault::compile(f, &format!("{path}.fault")))
            .transpose()?,
        mirrors: mirrors(r, path, ctx)?,
        cors: r
            .cors_policy
            .as_ref()
            .map(|c| cors(c, &format!("{path}.corsPolicy")))
            .transpose()?,
    };
    Ok((route, gateways))
}

fn l4_route(
    matches: Vec<L4Match>,
    gateways: Vec<Vec<String>>,
    route: &[vs::RouteDestination],
    path: &str,
    ctx: &Ctx,
) -> Result<(L4Route, Vec<Vec<String>>), E> {
    let items: Vec<_> = route
        .iter()
        .map(|d| (&d.destination, d.weight, None))
        .collect();
    let destinations = weighted(&items, &format!("{path}.route"), ctx)?;
    Ok((
        L4Route {
            matches,
            destinations,
        },
        gateways,
    ))
}

fn subnets(list: &[String], path: &str) -> Result<Vec<ipnet::IpNet>, E> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    (
                        format!("{path}[{i}]"),
                        format!("{s:?} is not an IP address or CIDR block"),
                    )
                })
        })
        .collect()
}

/// Compiles a whole VirtualService (delegate routes are kept for [`merge_delegate`]).
pub(crate) fn compile_virtual_service(
    spec: &VirtualServiceSpec,
    ctx: &Ctx,
) -> Result<CompiledVs, E> {
    let ns = ctx.namespace;
    let mut hosts = Vec::with_capacity(spec.hosts.len());
    for (i, h) in spec.hosts.iter().enumerate() {
        if h.trim().is_empty() {
            return err(format!("spec.hosts[{i}]"), "must not be empty");
        }
        hosts.push(resolve_host(h, ns, ctx.domain));
    }
    let gateways: Vec<String> = if spec.gateways.is_empty() {
        vec![MESH_GATEWAY.to_string()]
    } else {
        spec.gateways.iter().map(|g| gateway_name(g, ns)).collect()
    };
    if gateways.iter().any(|g| g == MESH_GATEWAY) {
        if let Some(i) = hosts.iter().position(|h| h == "*") {
            return err(
                format!("spec.hosts[{i}]"),
                "\"*\" is not allowed for a VirtualService bound to the mesh gateway",
            );
        }
    }
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        return err("spec", "at least one of http, tcp, tls is required");
    }
    if let Err((i, message)) = super::export::validate(&spec.export_to) {
        return err(format!("spec.exportTo[{i}]"), message);
    }
    let mut http = Vec::with_capacity(spec.http.len());
    for (i, r) in spec.http.iter().enumerate() {
        let path = format!("spec.http[{i}]");
        let Some(d) = &r.delegate else {
            http.push(RouteEntry::Route(Box::new(http_route(r, &path, ctx)?)));
            continue;
        };
        if hosts.is_empty() {
            return err(
                format!("{path}.delegate"),
                "a delegate VirtualService (no hosts) cannot delegate again",
            );
        }
        if !r.route.is_empty() || r.redirect.is_some() || r.direct_response.is_some() {
            return err(
                format!("{path}.delegate"),
                "cannot be combined with route, redirect or directResponse",
            );
        }
        if d.name.is_empty() {
            return err(format!("{path}.delegate.name"), "missing");
        }
        let mut matches = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            matches.push(compile_match(m, &format!("{path}.match[{j}]"), ns)?);
        }
        http.push(RouteEntry::Delegate {
            name: d.name.clone(),
            namespace: d
                .namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| ns.to_string()),
            matches,
        });
    }
    let mut tcp = Vec::new();
    for (i, r) in spec.tcp.iter().enumerate() {
        let path = format!("spec.tcp[{i}]");
        let mut matches = Vec::new();
        let mut gws = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            matches.push(L4Match {
                destination_subnets: subnets(
                    &m.destination_subnets,
                    &format!("{path}.match[{j}].destinationSubnets"),
                )?,
                port: m.port.filter(|p| *p != 0),
                source_labels: m.source_labels.clone(),
                source_namespace: m.source_namespace.clone().filter(|s| !s.is_empty()),
                sni_hosts: Vec::new(),
            });
            gws.push(m.gateways.iter().map(|g| gateway_name(g, ns)).collect());
        }
        tcp.push(l4_route(matches, gws, &r.route, &path, ctx)?);
    }
    let mut tls = Vec::new();
    for (i, r) in spec.tls.iter().enumerate() {
        let path = format!("spec.tls[{i}]");
        if r.matches.is_empty() {
            return err(
                format!("{path}.match"),
                "a TLS route needs at least one match with sniHosts",
            );
        }
        let mut matches = Vec::new();
        let mut gws = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            let mp = format!("{path}.match[{j}]");
            if m.sni_hosts.is_empty() {
                return err(
                    format!("{mp}.sniHosts"),
                    "at least one SNI host is required",
                );
            }
            matches.push(L4Match {
                destination_subnets: subnets(
                    &m.destination_subnets,
                    &format!("{mp}.destinationSubnets"),
                )?,
                port: m.port.filter(|p| *p != 0),
                source_labels: m.source_labels.clone(),
                source_namespace: m.source_namespace.clone().filter(|s| !s.is_empty()),
                sni_hosts: m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            });
            gws.push(m.gateways.iter().map(|g| gateway_name(g, ns)).collect());
        }
        tls.push(l4_route(matches, gws, &r.route, &path, ctx)?);
    }
    Ok(CompiledVs {
        hosts,
        gateways,
        http,
        tcp,
        tls,
        export_to: spec.export_to.clone(),
    })
}

/// The routes a root route delegating to `delegate` stands for: each delegate route with the
/// root's fields as defaults, its match blocks required together with the root's (every
/// combination). Paths in errors are the delegate's (`spec.http[1]…`).
pub(crate) fn merge_delegate(
    root: &HttpRouteSpec,
    root_matches: &[(RouteMatch, Vec<String>)],
    delegate: &VirtualServiceSpec,
    ctx: &Ctx,
) -> Result<Vec<GatedRoute>, E> {
    let mut out = Vec::new();
    for (j, d) in delegate.http.iter().enumerate() {
        let name = match (&root.name, &d.name) {
            (Some(r), Some(d)) => Some(format!("{r}-{d}")),
            (r, d) => d.clone().or_else(|| r.clone()),
        };
        let (mirror, mirror_percentage, mirror_percent) =
            if d.mirror.is_some() || !d.mirrors.is_empty() {
                (d.mirror.clone(), d.mirror_percentage, d.mirror_percent)
            } else {
                (
                    root.mirror.clone(),
                    root.mirror_percentage,
                    root.mirror_percent,
                )
            };
        let merged = HttpRouteSpec {
            name,
            matches: d.matches.clone(),
            route: d.route.clone(),
            redirect: d.redirect.clone(),
            direct_response: d.direct_response.clone(),
            delegate: None,
            rewrite: d.rewrite.clone().or_else(|| root.rewrite.clone()),
            timeout: d.timeout.or(root.timeout),
            retries: d.retries.clone().or_else(|| root.retries.clone()),
            fault: d.fault.clone().or_else(|| root.fault.clone()),
            mirror,
            mirrors: if d.mirrors.is_empty() && d.mirror.is_none() {
                root.mirrors.clone()
            } else {
                d.mirrors.clone()
            },
            mirror_percent,
            mirror_percentage,
            cors_policy: d.cors_policy.clone().or_else(|| root.cors_policy.clone()),
            headers: d.headers.clone().or_else(|| root.headers.clone()),
        };
        let (mut route, gateways) = http_route(&merged, &format!("spec.http[{j}]"), ctx)?;
        if !root_matches.is_empty() {
            let (own, own_gws) = (std::mem::take(&mut route.matches), gateways);
            let mut merged_gws = Vec::new();
            if own.is_empty() {
                for (rm, rg) in root_matches {
                    route.matches.push(rm.clone());
                    merged_gws.push(rg.clone());
                }
            } else {
                for (rm, rg) in root_matches {
                    let parent = Arc::new(rm.clone());
                    for (m, g) in own.iter().zip(&own_gws) {
                        let mut m = m.clone();
                        m.parent = Some(parent.clone());
                        route.matches.push(m);
                        merged_gws.push(if g.is_empty() { rg.clone() } else { g.clone() });
                    }
                }
            }
            out.push((route, merged_gws));
        } else {
            out.push((route, gateways));
        }
    }
    Ok(out)
}
