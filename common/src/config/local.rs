//! The ztunnel local-config document (no `apiVersion`/`kind`): `workloads`, `services` and
//! `policies` in Istio ztunnel's camelCase form, plus our `meshConfig` extension (root
//! namespace, trust domain, mesh-wide outbound traffic policy). Unknown keys and YAML errors
//! fail the whole file; a policy that parses but fails its checks is rejected alone and
//! replaced by a DENY-all for its scope (fail closed, see [`super::reject`]).

use super::{Collected, ConfigError, Document, Origin};
use crate::identity::DEFAULT_TRUST_DOMAIN;
use crate::model::{
    AddressMatch, Authorization, OutboundTrafficMode, PolicyAction, Rule, RuleMatch, Service,
    StringMatch, Workload,
};
use crate::snapshot::DEFAULT_ROOT_NAMESPACE;
use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;
use std::sync::Arc;

/// Mesh-wide settings (our extension of the local form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfig {
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            root_namespace: default_root_namespace(),
            trust_domain: default_trust_domain(),
            outbound_traffic_policy: OutboundTrafficPolicy::default(),
        }
    }
}

/// `outboundTrafficPolicy: {mode: ALLOW_ANY|REGISTRY_ONLY}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OutboundTrafficPolicy {
    #[serde(default)]
    pub mode: OutboundTrafficMode,
}

fn default_root_namespace() -> String {
    DEFAULT_ROOT_NAMESPACE.to_string()
}
fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalDoc {
    #[serde(default)]
    workloads: Vec<Workload>,
    #[serde(default)]
    services: Vec<Service>,
    #[serde(default)]
    policies: Vec<Authorization>,
    #[serde(default)]
    mesh_config: Option<MeshConfig>,
}

/// Loads one local-form document. `value` is the already-parsed document (used to tell which
/// optional keys were written); the text is deserialised again for path-aware errors.
pub(super) fn load(
    doc: &Document,
    value: &Value,
    source: &str,
    out: &mut Collected,
) -> Result<(), ConfigError> {
    let error = |resource: Option<String>, field: Option<String>, message: String| ConfigError {
        file: source.to_string(),
        document: Some(doc.index),
        resource,
        field,
        message,
    };
    let parsed: LocalDoc = serde_yaml_ng::from_str(&doc.text)
        .map_err(|e| error(None, None, super::yaml_message(&e, doc)))?;

    if let Some(mesh) = parsed.mesh_config {
        if let Some((_, first)) = &out.mesh {
            return Err(error(
                None,
                Some("meshConfig".into()),
                format!("given twice (first in document {first})"),
            ));
        }
        for (field, v) in [
            ("rootNamespace", &mesh.root_namespace),
            ("trustDomain", &mesh.trust_domain),
        ] {
            if v.is_empty() {
                return Err(error(
                    None,
                    Some(format!("meshConfig.{field}")),
                    "must not be empty".into(),
                ));
            }
        }
        out.mesh = Some((mesh, doc.index));
    }

    let raw_workloads = value.get("workloads").and_then(Value::as_sequence);
    for (i, w) in parsed.workloads.into_iter().enumerate() {
        let explicit_td = raw_workloads
            .and_then(|s| s.get(i))
            .is_some_and(|raw| raw.get("trustDomain").is_some());
        let origin = Origin {
            doc: doc.index,
            resource: format!("workload {}/{}", w.namespace, w.name),
            field: format!("workloads[{i}]"),
        };
        out.workloads.push((Arc::new(w), origin, explicit_td));
    }
    for (i, s) in parsed.services.into_iter().enumerate() {
        let origin = Origin {
            doc: doc.index,
            resource: format!("service {}/{}", s.namespace, s.hostname),
            field: format!("services[{i}]"),
        };
        out.services.push((Arc::new(s), origin));
    }
    for (i, p) in parsed.policies.into_iter().enumerate() {
        let origin = Origin {
            doc: doc.index,
            resource: format!("policy {}/{}", p.namespace, p.name),
            field: format!("policies[{i}]"),
        };
        if let Err((field, message)) = check_policy(&p) {
            // Rejected alone, replaced by a DENY-all for the same scope (see `super::reject`).
            out.rejected.push(error(
                Some(origin.resource.clone()),
                Some(origin.field(&field)),
                format!("{message}; fail-closed: until it is fixed, a DENY-all stand-in applies in its place"),
            ));
            let stand_in = Authorization {
                action: PolicyAction::Deny,
                rules: vec![Rule::default()],
                has_l7_rules: false,
                ..p
            };
            out.policies.push((stand_in, origin, false));
            continue;
        }
        out.policies.push((p, origin, false));
    }
    Ok(())
}

/// Checks what serde cannot: typed string matches set exactly one field, address prefix
/// lengths fit the address family.
pub(crate) fn check_policy(p: &Authorization) -> Result<(), (String, String)> {
    for (r, rule) in p.rules.iter().enumerate() {
        for (c, clause) in rule.clauses.iter().enumerate() {
            for (m, rm) in clause.matches.iter().enumerate() {
                let at =
                    |f: &str, i: usize| format!("rules[{r}].clauses[{c}].matches[{m}].{f}[{i}]");
                check_match(rm, &at)?;
            }
        }
    }
    Ok(())
}

fn check_match(m: &RuleMatch, at: &dyn Fn(&str, usize) -> String) -> Result<(), (String, String)> {
    let strings = [
        ("namespaces", &m.namespaces),
        ("notNamespaces", &m.not_namespaces),
        ("principals", &m.principals),
        ("notPrincipals", &m.not_principals),
    ];
    for (name, list) in strings {
        for (i, s) in list.iter().enumerate() {
            if let StringMatch::Typed(t) = s {
                let set = [
                    t.exact.is_some(),
                    t.prefix.is_some(),
                    t.suffix.is_some(),
                    t.presence.is_some(),
                ];
                if set.iter().filter(|b| **b).count() != 1 {
                    return Err((
                        at(name, i),
                        "set exactly one of exact, prefix, suffix, presence".into(),
                    ));
                }
            }
        }
    }
    let addresses = [
        ("sourceIps", &m.source_ips),
        ("notSourceIps", &m.not_source_ips),
        ("destinationIps", &m.destination_ips),
        ("notDestinationIps", &m.not_destination_ips),
    ];
    for (name, list) in addresses {
        for (i, a) in list.iter().enumerate() {
            if let AddressMatch::Parts { address, length } = a {
                if ipnet::IpNet::new(*address, *length).is_err() {
                    return Err((
                        at(name, i),
                        format!("prefix length {length} is too long for {address}"),
                    ));
                }
            }
        }
    }
    Ok(())
}
