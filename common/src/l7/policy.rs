//! L7 AuthorizationPolicy for the waypoint: the Istio spec as serde types, compiled to
//! [`L7Policy`] with the HTTP parts the L4 compile drops (`to.operation.hosts|methods|paths`,
//! `when` on `request.headers[...]`), evaluated per request with Istio's semantics: any matching
//! DENY denies, otherwise if ALLOW policies apply one must match. String patterns (`*`, `pre*`,
//! `*suf`) and IP blocks use the L4 matchers of [`crate::policy`]; which policies apply to a
//! destination workload is decided by the L4 scoping ([`crate::policy::applicable_policies`]).
//! Attributes this data plane does not have (JWT `request.auth.*`, `requestPrincipals`,
//! `connection.sni`) are absent: positive lists never match them, `not…` lists always do.

use crate::identity::Identity;
use crate::model::{AddressMatch, PolicyAction, StringMatch, Workload};
use crate::policy::{address_matches, applicable_policies, string_matches, Denied};
use crate::snapshot::Snapshot;
use http::{HeaderMap, HeaderName};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    #[serde(default)]
    pub provider: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub target_ref: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub target_refs: Vec<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default)]
    pub from: Vec<FromSpec>,
    #[serde(default)]
    pub to: Vec<ToSpec>,
    #[serde(default)]
    pub when: Vec<ConditionSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromSpec {
    pub source: SourceSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToSpec {
    pub operation: OperationSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperationSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
    #[serde(default)]
    pub ports: Vec<PortValue>,
    #[serde(default)]
    pub not_ports: Vec<PortValue>,
}

/// A port written as a string (Istio's form) or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortValue(pub u16);

impl<'de> Deserialize<'de> for PortValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortValue, E> {
                u16::try_from(v)
                    .ok()
                    .filter(|p| *p != 0)
                    .map(PortValue)
                    .ok_or_else(|| E::custom(format!("{v} is not a port number")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortValue, E> {
                self.visit_u64(u64::try_from(v).unwrap_or(0))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PortValue, E> {
                match s.trim().parse::<u64>() {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("{s:?} is not a port number"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConditionSpec {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// A source clause (`from[].source`).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceMatch {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub request_principals: Vec<StringMatch>,
    pub not_request_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<AddressMatch>,
    pub not_ip_blocks: Vec<AddressMatch>,
}

/// An operation clause (`to[].operation`); hosts lower-cased (matched case-insensitively).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationMatch {
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

/// The attribute a `when` condition reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ConditionKey {
    RequestHeader(#[serde(serialize_with = "super::ser::header_name")] HeaderName),
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    /// An attribute this data plane does not have (always absent).
    Absent(String),
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub key: ConditionKey,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

/// One rule: `from` (any source) AND `to` (any operation) AND every `when`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L7Rule {
    pub from: Vec<SourceMatch>,
    pub to: Vec<OperationMatch>,
    pub when: Vec<Condition>,
}

/// An AuthorizationPolicy compiled for HTTP evaluation.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L7Policy {
    pub name: String,
    pub namespace: String,
    pub action: PolicyAction,
    pub selector: BTreeMap<String, String>,
    pub rules: Vec<L7Rule>,
}

type E = (String, String);

fn plain(list: &[String]) -> Vec<StringMatch> {
    list.iter().map(|s| StringMatch::Plain(s.clone())).collect()
}

fn principals(list: &[String]) -> Vec<StringMatch> {
    list.iter()
        .map(|s| StringMatch::Plain(s.strip_prefix("spiffe://").unwrap_or(s).to_string()))
        .collect()
}

fn lower(list: &[String]) -> Vec<StringMatch> {
    list.iter()
        .map(|s| StringMatch::Plain(s.to_ascii_lowercase()))
        .collect()
}

fn addresses(lists: &[&[String]], path: &str) -> Result<Vec<AddressMatch>, E> {
    let mut out = Vec::new();
    for list in lists {
        for (i, s) in list.iter().enumerate() {
            let a = match s.parse::<IpAddr>() {
                Ok(ip) => AddressMatch::Ip(ip),
                Err(_) => AddressMatch::Cidr(s.parse().map_err(|_| {
                    (
                        format!("{path}[{i}]"),
                        format!("{s:?} is not an IP address or CIDR block"),
                    )
                })?),
            };
            out.push(a);
        }
    }
    Ok(out)
}

fn service_accounts(list: &[String], path: &str) -> Result<Vec<StringMatch>, E> {
    list.iter()
        .enumerate()
        .map(|(i, sa)| match sa.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(StringMatch::Plain(format!("*/ns/{ns}/sa/{name}")))
            }
            _ => Err((
                format!("{path}[{i}]"),
                format!("{sa:?} is not \"<namespace>/<service account>\""),
            )),
        })
        .collect()
}

fn condition_key(key: &str) -> ConditionKey {
    let header = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
        .and_then(|k| HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).ok());
    if let Some(h) = header {
        return ConditionKey::RequestHeader(h);
    }
    match key {
        "source.ip" | "remote.ip" => ConditionKey::SourceIp,
        "source.namespace" => ConditionKey::SourceNamespace,
        "source.principal" => ConditionKey::SourcePrincipal,
        "destination.ip" => ConditionKey::DestinationIp,
        "destination.port" => ConditionKey::DestinationPort,
        other => ConditionKey::Absent(other.to_string()),
    }
}

/// Compiles a policy (its spec already passed the L4 compile, so errors here are rare).
pub fn compile_policy(
    spec: &AuthorizationPolicySpec,
    name: &str,
    namespace: &str,
) -> Result<L7Policy, E> {
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => PolicyAction::Allow,
        Some("DENY") => PolicyAction::Deny,
        Some(other) => {
            return Err((
                "spec.action".into(),
                format!("action {other} is not supported by the waypoint (use ALLOW or DENY)"),
            ))
        }
    };
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (r, rule) in spec.rules.iter().enumerate() {
        let rp = format!("spec.rules[{r}]");
        let mut out = L7Rule::default();
        for (i, f) in rule.from.iter().enumerate() {
            let p = format!("{rp}.from[{i}].source");
            let s = &f.source;
            let mut m = SourceMatch {
                principals: principals(&s.principals),
                not_principals: principals(&s.not_principals),
                request_principals: plain(&s.request_principals),
                not_request_principals: plain(&s.not_request_principals),
                namespaces: plain(&s.namespaces),
                not_namespaces: plain(&s.not_namespaces),
                ip_blocks: addresses(
                    &[&s.ip_blocks, &s.remote_ip_blocks],
                    &format!("{p}.ipBlocks"),
                )?,
                not_ip_blocks: addresses(
                    &[&s.not_ip_blocks, &s.not_remote_ip_blocks],
                    &format!("{p}.notIpBlocks"),
                )?,
            };
            m.principals.extend(service_accounts(
                &s.service_accounts,
                &format!("{p}.serviceAccounts"),
            )?);
            m.not_principals.extend(service_accounts(
                &s.not_service_accounts,
                &format!("{p}.notServiceAccounts"),
            )?);
            out.from.push(m);
        }
        for t in &rule.to {
            let o = &t.operation;
            out.to.push(OperationMatch {
                hosts: lower(&o.hosts),
                not_hosts: lower(&o.not_hosts),
                methods: plain(&o.methods),
                not_methods: plain(&o.not_methods),
                paths: plain(&o.paths),
                not_paths: plain(&o.not_paths),
                ports: o.ports.iter().map(|p| p.0).collect(),
                not_ports: o.not_ports.iter().map(|p| p.0).collect(),
            });
        }
        for c in &rule.when {
            out.when.push(Condition {
                key: condition_key(&c.key),
                values: c.values.clone(),
                not_values: c.not_values.clone(),
            });
        }
        rules.push(out);
    }
    Ok(L7Policy {
        name: name.to_string(),
        namespace: namespace.to_string(),
        action,
        selector: spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .unwrap_or_default(),
        rules,
    })
}

/// What a policy is evaluated against, for one request.
#[derive(Debug, Clone)]
pub struct AuthzRequest<'a> {
    pub method: &'a str,
    /// `:authority` / `Host`.
    pub host: &'a str,
    /// Path, with or without the query string (it is ignored).
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The peer's identity from its certificate; `None` for plaintext.
    pub source: Option<&'a Identity>,
    pub source_ip: Option<IpAddr>,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: u16,
}

/// Decides a request under `policies` (those that apply to the destination).
pub fn authorize<'p>(
    policies: impl IntoIterator<Item = &'p L7Policy>,
    req: &AuthzRequest,
) -> Result<(), Denied> {
    let principal = req.source.map(Identity::principal);
    let ctx = Ctx {
        req,
        principal: principal.as_deref(),
    };
    let mut allows = 0usize;
    let mut allowed = false;
    for p in policies {
        let hit = p.rules.iter().any(|r| rule_matches(r, &ctx));
        match p.action {
            PolicyAction::Deny if hit => {
                let key = format!("{}/{}", p.namespace, p.name);
                return Err(Denied {
                    reason: format!("denied by DENY policy {key}"),
                    policy: Some(key),
                });
            }
            PolicyAction::Deny => {}
            PolicyAction::Allow => {
                allows += 1;
                allowed |= hit;
            }
        }
    }
    if allows == 0 || allowed {
        Ok(())
    } else {
        Err(Denied {
            policy: None,
            reason: format!("no ALLOW policy matched ({allows} apply)"),
        })
    }
}

impl super::L7Config {
    /// The L7 form of the policies that apply to destination workload `dst` (Istio's scoping:
    /// root namespace, namespace, selector, and names the workload lists).
    pub fn policies_for<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        dst: &'a Workload,
    ) -> Vec<&'a L7Policy> {
        applicable_policies(snapshot, dst)
            .filter_map(|a| {
                self.authorization_policies
                    .get(&format!("{}/{}", a.namespace, a.name))
            })
            .map(|p| p.as_ref())
            .collect()
    }
}

struct Ctx<'a> {
    req: &'a AuthzRequest<'a>,
    principal: Option<&'a str>,
}

fn positive<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(hit)
}

fn negative<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
    !list.iter().any(hit)
}

fn rule_matches(rule: &L7Rule, ctx: &Ctx) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, ctx)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, ctx.req)))
        && rule.when.iter().all(|c| condition_matches(c, ctx))
}

fn source_matches(s: &SourceMatch, ctx: &Ctx) -> bool {
    let principal = |m: &StringMatch| ctx.principal.is_some_and(|p| string_matches(m, p));
    let namespace = |m: &StringMatch| {
        ctx.req
            .source
            .is_some_and(|id| string_matches(m, &id.namespace))
    };
    let ip = |a: &AddressMatch| {
        ctx.req
            .source_ip
            .is_some_and(|ip| address_matches(a, ip.to_canonical()))
    };
    positive(&s.principals, principal)
        && negative(&s.not_principals, principal)
        && s.request_principals.is_empty()
        && positive(&s.namespaces, namespace)
        && negative(&s.not_namespaces, namespace)
        && positive(&s.ip_blocks, ip)
        && negative(&s.not_ip_blocks, ip)
}

fn operation_matches(o: &OperationMatch, req: &AuthzRequest) -> bool {
    let host = req.host.to_ascii_lowercase();
    let path = super::rewrite::split_path(req.path).0;
    let h = |m: &StringMatch| string_matches(m, &host);
    let method = |m: &StringMatch| string_matches(m, req.method);
    let p = |m: &StringMatch| string_matches(m, path);
    positive(&o.hosts, h)
        && negative(&o.not_hosts, h)
        && positive(&o.methods, method)
        && negative(&o.not_methods, method)
        && positive(&o.paths, p)
        && negative(&o.not_paths, p)
        && positive(&o.ports, |port| *port == req.destination_port)
        && negative(&o.not_ports, |port| *port == req.destination_port)
}

fn condition_matches(c: &Condition, ctx: &Ctx) -> bool {
    let req = ctx.req;
    let value: Option<String> = match &c.key {
        ConditionKey::RequestHeader(h) => super::matching::header_value(req.headers, h),
        ConditionKey::SourceNamespace => req.source.map(|id| id.namespace.clone()),
        ConditionKey::SourcePrincipal => ctx.principal.map(str::to_string),
        ConditionKey::DestinationPort => Some(req.destination_port.to_string()),
        ConditionKey::SourceIp | ConditionKey::DestinationIp => {
            let ip = if c.key == ConditionKey::SourceIp {
                req.source_ip
            } else {
                req.destination_ip
            };
            let hit = |s: &String| {
                ip.is_some_and(|ip| {
                    let a = s
                        .parse::<IpAddr>()
                        .map(AddressMatch::Ip)
                        .or_else(|_| s.parse().map(AddressMatch::Cidr));
                    a.is_ok_and(|a| address_matches(&a, ip.to_canonical()))
                })
            };
            return positive(&c.values, hit) && negative(&c.not_values, hit);
        }
        ConditionKey::Absent(_) => None,
    };
    let hit = |pattern: &String| {
        let pattern = match &c.key {
            ConditionKey::SourcePrincipal => pattern.strip_prefix("spiffe://").unwrap_or(pattern),
            _ => pattern.as_str(),
        };
        value
            .as_deref()
            .is_some_and(|v| string_matches(&StringMatch::Plain(pattern.to_string()), v))
    };
    positive(&c.values, hit) && negative(&c.not_values, hit)
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
