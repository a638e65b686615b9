//! Conversions between the config model ([`crate::model`]) and the wire types of Istio's WDS and
//! authorization protos. The controller encodes with the `*_to_proto` functions; the proxies
//! decode with the `*_from_proto` ones, which reject what Istio's ztunnel rejects (malformed
//! addresses, service keys without `/`, gateway addresses without a destination) with a
//! [`ConvertError`] naming the field, never a panic.
//!
//! What WDS has no field for rides in places Istio's ztunnel ignores: a workload's labels in a
//! `Workload.extensions` entry named [`super::LABELS_EXTENSION`]; a service's declared port
//! protocols in `Port.app_protocol` (HTTP/1.1, HTTP/2, gRPC, TCP, TLS; anything finer is lost).

use super::mesh_config::WorkloadLabels;
use super::{security as sec, workload as wds, LABELS_EXTENSION};
use crate::model::{
    self, AddressMatch, Authorization, GatewayAddress, HealthStatus, PolicyAction, PolicyScope,
    Protocol, RuleMatch, StringMatch, TypedStringMatch,
};
use crate::snapshot::parse_network_address;
use prost::Message;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A resource that cannot be turned into the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConvertError {
    pub field: String,
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> ConvertError {
    ConvertError {
        field: field.into(),
        message: message.into(),
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ip_from_bytes(b: &[u8], field: &str) -> Result<IpAddr, ConvertError> {
    match b.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(b).unwrap_or_default())),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(b).unwrap_or_default()).to_canonical()),
        n => Err(bad(field, format!("an address has 4 or 16 bytes, not {n}"))),
    }
}

fn network_address(s: &str, field: &str) -> Result<wds::NetworkAddress, ConvertError> {
    let (network, ip) = parse_network_address(s).map_err(|m| bad(field, m))?;
    Ok(wds::NetworkAddress {
        network: network.to_string(),
        address: ip_bytes(ip),
        length: None,
    })
}

fn network_address_string(a: &wds::NetworkAddress, field: &str) -> Result<String, ConvertError> {
    let ip = ip_from_bytes(&a.address, field)?;
    Ok(format!("{}/{ip}", a.network))
}

// ---------------------------------------------------------------------------------------------
// Gateway addresses (waypoints)

fn gateway_to_proto(gw: &GatewayAddress) -> Result<wds::GatewayAddress, ConvertError> {
    use wds::gateway_address::Destination;
    let destination = match parse_network_address(&gw.destination) {
        Ok(_) => Destination::Address(network_address(&gw.destination, "waypoint")?),
        // `<namespace>/<hostname>`: Istio's preferred form.
        Err(_) => match gw.destination.split_once('/') {
            Some((ns, host)) if !host.is_empty() && !host.contains('/') => {
                Destination::Hostname(wds::NamespacedHostname {
                    namespace: ns.to_string(),
                    hostname: host.to_string(),
                })
            }
            _ => {
                return Err(bad(
                    "waypoint.destination",
                    format!(
                        "{:?} is neither <network>/<IP> nor <namespace>/<hostname>",
                        gw.destination
                    ),
                ))
            }
        },
    };
    Ok(wds::GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: u32::from(gw.hbone_mtls_port),
    })
}

fn gateway_from_proto(
    gw: &wds::GatewayAddress,
    field: &str,
) -> Result<GatewayAddress, ConvertError> {
    use wds::gateway_address::Destination;
    let destination = match &gw.destination {
        Some(Destination::Address(a)) => network_address_string(a, field)?,
        Some(Destination::Hostname(h)) if !h.hostname.is_empty() => {
            format!("{}/{}", h.namespace, h.hostname)
        }
        _ => {
            return Err(bad(
                field,
                "a gateway address needs a hostname or an address",
            ))
        }
    };
    let port = u16::try_from(gw.hbone_mtls_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            bad(
                field,
                format!("hboneMtlsPort {} is not a port", gw.hbone_mtls_port),
            )
        })?;
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port: port,
        identity: None,
    })
}

// ---------------------------------------------------------------------------------------------
// Workloads

fn workload_type_to_proto(t: &str) -> wds::WorkloadType {
    match t.to_ascii_lowercase().as_str() {
        "pod" => wds::WorkloadType::Pod,
        "job" => wds::WorkloadType::Job,
        "cronjob" => wds::WorkloadType::Cronjob,
        _ => wds::WorkloadType::Deployment,
    }
}

fn workload_type_from_proto(t: i32) -> String {
    match wds::WorkloadType::try_from(t).unwrap_or(wds::WorkloadType::Deployment) {
        wds::WorkloadType::Deployment => "deployment",
        wds::WorkloadType::Cronjob => "cronjob",
        wds::WorkloadType::Pod => "pod",
        wds::WorkloadType::Job => "job",
    }
    .to_string()
}

/// The WDS form of a workload. Fails only on a waypoint address that cannot be expressed.
pub fn workload_to_proto(w: &model::Workload) -> Result<wds::Workload, ConvertError> {
    let services = w
        .services
        .iter()
        .map(|(key, ports)| {
            let ports = ports
                .iter()
                .map(|(&sp, &tp)| wds::Port {
                    service_port: u32::from(sp),
                    target_port: u32::from(tp),
                    app_protocol: 0,
                })
                .collect();
            (key.clone(), wds::PortList { ports })
        })
        .collect();
    let mut extensions = Vec::new();
    if !w.labels.is_empty() || w.terminating || !w.annotations.is_empty() {
        let labels = WorkloadLabels {
            labels: w.labels.clone().into_iter().collect(),
            terminating: w.terminating,
            annotations: w.annotations.clone().into_iter().collect(),
        };
        extensions.push(wds::Extension {
            name: LABELS_EXTENSION.to_string(),
            config: Some(prost_types::Any {
                type_url: format!("type.googleapis.com/{LABELS_EXTENSION}"),
                value: labels.encode_to_vec(),
            }),
        });
    }
    Ok(wds::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.workload_ips.iter().map(|ip| ip_bytes(*ip)).collect(),
        hostname: w.hostname.clone(),
        network: w.network.clone(),
        tunnel_protocol: match w.protocol {
            Protocol::Hbone => wds::TunnelProtocol::Hbone,
            Protocol::Tcp => wds::TunnelProtocol::None,
        } as i32,
        // istiod elides the default trust domain; Istio's ztunnel reads empty as cluster.local.
        trust_domain: if w.trust_domain == crate::identity::DEFAULT_TRUST_DOMAIN {
            String::new()
        } else {
            w.trust_domain.clone()
        },
        service_account: w.service_account.clone(),
        waypoint: w.waypoint.as_ref().map(gateway_to_proto).transpose()?,
        network_gateway: None,
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_type: workload_type_to_proto(&w.workload_type) as i32,
        workload_name: w.workload_name.clone(),
        native_tunnel: false,
        application_tunnel: None,
        services,
        authorization_policies: w.authorization_policies.clone(),
        status: match w.status {
            HealthStatus::Healthy => wds::WorkloadStatus::Healthy,
            HealthStatus::Unhealthy => wds::WorkloadStatus::Unhealthy,
        } as i32,
        cluster_id: w.cluster_id.clone(),
        locality: w.locality.as_ref().map(|l| wds::Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        }),
        network_mode: wds::NetworkMode::Standard as i32,
        extensions,
        capacity: w.capacity,
    })
}

/// The model form of a WDS workload; rejects what Istio's ztunnel rejects.
pub fn workload_from_proto(p: wds::Workload) -> Result<model::Workload, ConvertError> {
    if p.uid.is_empty() {
        return Err(bad("uid", "a workload needs a uid"));
    }
    let workload_ips = p
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip_from_bytes(a, &format!("addresses[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut services = model::SmallMap::with_capacity(p.services.len());
    for (key, list) in &p.services {
        if !key.contains('/') {
            return Err(bad(
                format!("services[{key:?}]"),
                "a service key is <namespace>/<hostname>",
            ));
        }
        let mut ports = BTreeMap::new();
        for (i, port) in list.ports.iter().enumerate() {
            let field = format!("services[{key:?}].ports[{i}]");
            let sp = u16::try_from(port.service_port)
                .map_err(|_| bad(&field, "servicePort is not a port"))?;
            let tp = u16::try_from(port.target_port)
                .map_err(|_| bad(&field, "targetPort is not a port"))?;
            ports.insert(sp, tp);
        }
        services.insert(key.clone(), ports);
    }
    let mut labels = model::Labels::new();
    let mut annotations = BTreeMap::new();
    let mut terminating = false;
    for (i, ext) in p.extensions.iter().enumerate() {
        if ext.name != LABELS_EXTENSION {
            continue;
        }
        let value = ext
            .config
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        let decoded = WorkloadLabels::decode(value)
            .map_err(|e| bad(format!("extensions[{i}]"), format!("bad labels: {e}")))?;
        labels.reserve(decoded.labels.len());
        labels.extend(decoded.labels);
        annotations.extend(decoded.annotations);
        terminating |= decoded.terminating;
    }
    let waypoint = p
        .waypoint
        .as_ref()
        .map(|gw| gateway_from_proto(gw, "waypoint"))
        .transpose()?;
    let trust_domain = if p.trust_domain.is_empty() {
        crate::identity::DEFAULT_TRUST_DOMAIN.to_string()
    } else {
        p.trust_domain
    };
    Ok(model::Workload {
        uid: p.uid,
        name: p.name,
        namespace: p.namespace,
        service_account: if p.service_account.is_empty() {
            "default".to_string()
        } else {
            p.service_account
        },
        trust_domain,
        workload_ips,
        protocol: match wds::TunnelProtocol::try_from(p.tunnel_protocol) {
            Ok(wds::TunnelProtocol::Hbone) => Protocol::Hbone,
            _ => Protocol::Tcp,
        },
        node: p.node,
        network: p.network,
        cluster_id: p.cluster_id,
        hostname: p.hostname,
        workload_name: p.workload_name,
        workload_type: workload_type_from_proto(p.workload_type),
        canonical_name: p.canonical_name,
        canonical_revision: p.canonical_revision,
        waypoint,
        status: match wds::WorkloadStatus::try_from(p.status) {
            Ok(wds::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
            _ => HealthStatus::Healthy,
        },
        terminating,
        locality: p.locality.map(|l| model::Locality {
            region: l.region,
            zone: l.zone,
            subzone: l.subzone,
        }),
        authorization_policies: p.authorization_policies,
        services,
        labels,
        annotations,
        capacity: p.capacity,
    })
}

// ---------------------------------------------------------------------------------------------
// Services

fn app_protocol_to_proto(p: Option<&String>) -> wds::AppProtocol {
    use crate::model::PortProtocol as P;
    let Some(p) = p else {
        return wds::AppProtocol::Unknown;
    };
    let lower = p.to_ascii_lowercase();
    if lower == "grpc" || lower.starts_with("grpc-") && lower != "grpc-web" {
        return wds::AppProtocol::Grpc;
    }
    match P::parse(p) {
        P::Http => wds::AppProtocol::Http11,
        P::Http2 => wds::AppProtocol::Http2,
        P::Tls => wds::AppProtocol::Tls,
        P::Tcp => wds::AppProtocol::Tcp,
        P::Sniff => wds::AppProtocol::Unknown,
    }
}

fn app_protocol_from_proto(p: i32) -> Option<&'static str> {
    match wds::AppProtocol::try_from(p).ok()? {
        wds::AppProtocol::Unknown => None,
        wds::AppProtocol::Http11 => Some("http"),
        wds::AppProtocol::Http2 => Some("http2"),
        wds::AppProtocol::Grpc => Some("grpc"),
        wds::AppProtocol::Tcp => Some("tcp"),
        wds::AppProtocol::Tls => Some("tls"),
    }
}

/// The WDS form of a service.
pub fn service_to_proto(s: &model::Service) -> Result<wds::Service, ConvertError> {
    let addresses = s
        .vips
        .iter()
        .enumerate()
        .map(|(i, v)| network_address(v, &format!("vips[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = s
        .ports
        .iter()
        .map(|(&sp, &tp)| wds::Port {
            service_port: u32::from(sp),
            target_port: u32::from(tp),
            app_protocol: app_protocol_to_proto(s.app_protocols.get(&sp)) as i32,
        })
        .collect();
    Ok(wds::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses,
        ports,
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_ref().map(gateway_to_proto).transpose()?,
        load_balancing: None,
        ip_families: 0,
        extensions: s
            .service_entry
            .iter()
            .map(|_| wds::Extension {
                name: super::SERVICE_ENTRY_MARKER.to_string(),
                config: None,
            })
            .collect(),
        canonical: false,
        ingress_use_waypoint: false,
        weighted_waypoints: Vec::new(),
        visibility: 0,
    })
}

/// The model form of a WDS service.
pub fn service_from_proto(p: wds::Service) -> Result<model::Service, ConvertError> {
    if p.hostname.is_empty() {
        return Err(bad("hostname", "a service needs a hostname"));
    }
    let vips = p
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| network_address_string(a, &format!("addresses[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = BTreeMap::new();
    let mut app_protocols = BTreeMap::new();
    for (i, port) in p.ports.iter().enumerate() {
        let field = format!("ports[{i}]");
        let sp = u16::try_from(port.service_port)
            .map_err(|_| bad(&field, "servicePort is not a port"))?;
        let tp =
            u16::try_from(port.target_port).map_err(|_| bad(&field, "targetPort is not a port"))?;
        ports.insert(sp, tp);
        if let Some(proto) = app_protocol_from_proto(port.app_protocol) {
            app_protocols.insert(sp, proto.to_string());
        }
    }
    let waypoint = p
        .waypoint
        .as_ref()
        .map(|gw| gateway_from_proto(gw, "waypoint"))
        .transpose()?;
    Ok(model::Service {
        name: p.name,
        namespace: p.namespace,
        hostname: p.hostname,
        vips,
        ports,
        subject_alt_names: p.subject_alt_names,
        app_protocols,
        labels: BTreeMap::new(),
        waypoint,
        load_balancer: None,
        ip_families: None,
        service_entry: None,
    })
}

// ---------------------------------------------------------------------------------------------
// Authorization

fn string_match_to_proto(m: &StringMatch) -> sec::StringMatch {
    use sec::string_match::MatchType;
    let t = match m {
        StringMatch::Plain(p) => {
            let p = p.strip_prefix("spiffe://").unwrap_or(p);
            if p == "*" {
                MatchType::Presence(())
            } else if let Some(suffix) = p.strip_prefix('*') {
                MatchType::Suffix(suffix.to_string())
            } else if let Some(prefix) = p.strip_suffix('*') {
                MatchType::Prefix(prefix.to_string())
            } else {
                MatchType::Exact(p.to_string())
            }
        }
        StringMatch::Typed(t) => {
            if let Some(e) = &t.exact {
                MatchType::Exact(e.clone())
            } else if let Some(p) = &t.prefix {
                MatchType::Prefix(p.clone())
            } else if let Some(s) = &t.suffix {
                MatchType::Suffix(s.clone())
            } else {
                MatchType::Presence(())
            }
        }
    };
    sec::StringMatch {
        match_type: Some(t),
    }
}

fn string_match_from_proto(m: &sec::StringMatch, field: &str) -> Result<StringMatch, ConvertError> {
    use sec::string_match::MatchType;
    let typed = |exact, prefix, suffix, presence| {
        StringMatch::Typed(TypedStringMatch {
            exact,
            prefix,
            suffix,
            presence,
        })
    };
    Ok(match &m.match_type {
        Some(MatchType::Exact(e)) => typed(Some(e.clone()), None, None, None),
        Some(MatchType::Prefix(p)) => typed(None, Some(p.clone()), None, None),
        Some(MatchType::Suffix(s)) => typed(None, None, Some(s.clone()), None),
        Some(MatchType::Presence(())) => {
            typed(None, None, None, Some(serde_json::Value::Bool(true)))
        }
        None => {
            return Err(bad(
                field,
                "a string match needs exact, prefix, suffix or presence",
            ))
        }
    })
}

fn address_to_proto(a: &AddressMatch) -> sec::Address {
    let (ip, len) = match a {
        AddressMatch::Cidr(net) => (net.addr(), net.prefix_len()),
        AddressMatch::Ip(ip) => (*ip, if ip.is_ipv4() { 32 } else { 128 }),
        AddressMatch::Parts { address, length } => (*address, *length),
    };
    sec::Address {
        address: ip_bytes(ip),
        length: u32::from(len),
    }
}

fn address_from_proto(a: &sec::Address, field: &str) -> Result<AddressMatch, ConvertError> {
    let ip = ip_from_bytes(&a.address, field)?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let length = u8::try_from(a.length)
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| bad(field, format!("prefix length {} is out of range", a.length)))?;
    Ok(AddressMatch::Parts {
        address: ip,
        length,
    })
}

fn match_to_proto(m: &RuleMatch) -> sec::Match {
    let sm = |v: &[StringMatch]| v.iter().map(string_match_to_proto).collect();
    let am = |v: &[AddressMatch]| v.iter().map(address_to_proto).collect();
    let ports = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect();
    sec::Match {
        namespaces: sm(&m.namespaces),
        not_namespaces: sm(&m.not_namespaces),
        service_accounts: Vec::new(),
        not_service_accounts: Vec::new(),
        principals: sm(&m.principals),
        not_principals: sm(&m.not_principals),
        source_ips: am(&m.source_ips),
        not_source_ips: am(&m.not_source_ips),
        destination_ips: am(&m.destination_ips),
        not_destination_ips: am(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        extensions: Vec::new(),
    }
}

fn match_from_proto(m: &sec::Match, field: &str) -> Result<RuleMatch, ConvertError> {
    let sm = |v: &[sec::StringMatch], name: &str| {
        v.iter()
            .enumerate()
            .map(|(i, s)| string_match_from_proto(s, &format!("{field}.{name}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    let am = |v: &[sec::Address], name: &str| {
        v.iter()
            .enumerate()
            .map(|(i, a)| address_from_proto(a, &format!("{field}.{name}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    let ports = |v: &[u32], name: &str| {
        v.iter()
            .enumerate()
            .map(|(i, p)| {
                u16::try_from(*p)
                    .map_err(|_| bad(format!("{field}.{name}[{i}]"), format!("{p} is not a port")))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    // A service-account match is a principal whose namespace and account are fixed, in any
    // trust domain.
    let sa = |v: &[sec::ServiceAccountMatch]| {
        v.iter()
            .map(|s| StringMatch::Plain(format!("*/ns/{}/sa/{}", s.namespace, s.service_account)))
            .collect::<Vec<_>>()
    };
    let mut principals = sm(&m.principals, "principals")?;
    principals.extend(sa(&m.service_accounts));
    let mut not_principals = sm(&m.not_principals, "notPrincipals")?;
    not_principals.extend(sa(&m.not_service_accounts));
    Ok(RuleMatch {
        namespaces: sm(&m.namespaces, "namespaces")?,
        not_namespaces: sm(&m.not_namespaces, "notNamespaces")?,
        principals,
        not_principals,
        source_ips: am(&m.source_ips, "sourceIps")?,
        not_source_ips: am(&m.not_source_ips, "notSourceIps")?,
        destination_ips: am(&m.destination_ips, "destinationIps")?,
        not_destination_ips: am(&m.not_destination_ips, "notDestinationIps")?,
        destination_ports: ports(&m.destination_ports, "destinationPorts")?,
        not_destination_ports: ports(&m.not_destination_ports, "notDestinationPorts")?,
    })
}

/// The Istio form of an L4 policy. A policy whose source had HTTP-only fields is sent with
/// Istio's fail-closed meaning made explicit: a DENY matches everything (one rule without
/// clauses), an ALLOW matches nothing (no rules). Selector-scoped policies are bound through
/// `Workload.authorization_policies`, which the controller fills.
pub fn authorization_to_proto(a: &Authorization) -> sec::Authorization {
    let rules = if a.has_l7_rules {
        match a.action {
            PolicyAction::Deny => vec![sec::Rule {
                clauses: Vec::new(),
            }],
            PolicyAction::Allow => Vec::new(),
        }
    } else {
        a.rules
            .iter()
            .map(|r| sec::Rule {
                clauses: r
                    .clauses
                    .iter()
                    .map(|c| sec::Clause {
                        matches: c.matches.iter().map(match_to_proto).collect(),
                    })
                    .collect(),
            })
            .collect()
    };
    sec::Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope: match a.scope {
            PolicyScope::Global => sec::Scope::Global,
            PolicyScope::Namespace => sec::Scope::Namespace,
            PolicyScope::WorkloadSelector => sec::Scope::WorkloadSelector,
        } as i32,
        action: match a.action {
            PolicyAction::Allow => sec::Action::Allow,
            PolicyAction::Deny => sec::Action::Deny,
        } as i32,
        rules,
        dry_run: false,
        extensions: Vec::new(),
    }
}

/// The model form of an Istio L4 policy. Unknown scopes or actions are refused (a policy we
/// cannot read must not silently become something else). A dry-run policy is evaluated by
/// nobody here and yields `None`.
pub fn authorization_from_proto(
    p: sec::Authorization,
) -> Result<Option<Authorization>, ConvertError> {
    if p.name.is_empty() {
        return Err(bad("name", "a policy needs a name"));
    }
    let scope = match sec::Scope::try_from(p.scope) {
        Ok(sec::Scope::Global) => PolicyScope::Global,
        Ok(sec::Scope::Namespace) => PolicyScope::Namespace,
        Ok(sec::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
        Err(_) => return Err(bad("scope", format!("unknown scope {}", p.scope))),
    };
    let action = match sec::Action::try_from(p.action) {
        Ok(sec::Action::Allow) => PolicyAction::Allow,
        Ok(sec::Action::Deny) => PolicyAction::Deny,
        Err(_) => return Err(bad("action", format!("unknown action {}", p.action))),
    };
    let mut rules = Vec::with_capacity(p.rules.len());
    for (ri, r) in p.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(r.clauses.len());
        for (ci, c) in r.clauses.iter().enumerate() {
            let matches = c
                .matches
                .iter()
                .enumerate()
                .map(|(mi, m)| {
                    match_from_proto(m, &format!("rules[{ri}].clauses[{ci}].matches[{mi}]"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            clauses.push(model::Clause { matches });
        }
        rules.push(model::Rule { clauses });
    }
    if p.dry_run {
        return Ok(None);
    }
    Ok(Some(Authorization {
        name: p.name,
        namespace: p.namespace,
        scope,
        action,
        rules,
        selector: BTreeMap::new(),
        has_l7_rules: false,
    }))
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
