//! Per-resource rejection of Kubernetes-style documents, and the fail-closed stand-ins that
//! take the place of a rejected security resource.
//!
//! # The rule
//! An Istio (or Kubernetes) document that is well-formed YAML with a readable `apiVersion` and
//! `kind` is accepted or rejected on its own: a rejected one is listed in `Snapshot::rejected`
//! (file, document, resource, field, message; shown under `rejected` in `/config_dump`) and
//! the rest of the file applies. A document that is not even that (a YAML syntax error, no
//! readable kind) still fails the whole file, since nobody can tell what it was meant to
//! protect.
//!
//! Rejecting a security resource must never open a path around policy, so a rejected one is
//! replaced by a stand-in that is at least as strict as anything it could have said, for the
//! scope that can still be read from it:
//! - **AuthorizationPolicy** (ALLOW or DENY alike: a missing ALLOW widens access too): a
//!   DENY-all policy with the same namespace and name and the same `selector` (workload scope),
//!   or the same `targetRefs` (waypoint scope) when those can be read; when they cannot, a
//!   DENY-all for the whole namespace (mesh-wide for the root namespace). It has no HTTP rules,
//!   so ztunnels enforce it too, even for a waypoint's connections. If not even the namespace
//!   can be read, the whole file is rejected (the last good configuration stays).
//! - **PeerAuthentication**: `STRICT` for its selector (or namespace).
//! - **Sidecar**: `REGISTRY_ONLY` with no egress host allowed, for its selector (or namespace).
//!
//! The rejection message says which stand-in is in force. Other kinds (Gateways, Kubernetes
//! resources, unsupported kinds) are just left out.

use super::walk::{labels, Obj};
use super::{Collected, ConfigError, Document, FieldError, Origin};
use crate::l7::attached::{AttachedPolicy, PolicyTarget};
use crate::l7::policy::{L7Policy, L7Rule};
use crate::model::{
    Authorization, EgressListener, MtlsMode, OutboundTrafficMode, PeerAuthentication, PolicyAction,
    PolicyScope, Rule, SidecarScope,
};
use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

/// What can still be read of a rejected resource's scope.
struct Scope {
    namespace: String,
    name: String,
    /// `None` when the selector was written but cannot be read (then the namespace is used).
    selector: Option<BTreeMap<String, String>>,
    /// Targets when they were written and can be read.
    targets: Vec<PolicyTarget>,
}

/// Reads namespace, name, selector (`selector_key.labels_key`) and targetRefs, as far as
/// possible. `None` when the namespace cannot be read.
fn scope(value: &Value, doc: usize, selector_key: &str, labels_key: &str) -> Option<Scope> {
    let meta = value.get("metadata");
    let namespace = match meta.and_then(|m| m.get("namespace")) {
        None | Some(Value::Null) => "default".to_string(),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return None,
    };
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| format!("unnamed-document-{doc}"));
    let spec = value.get("spec");
    let selector = match spec.and_then(|s| s.get(selector_key)) {
        None => Some(BTreeMap::new()),
        Some(sel) => Obj::new(sel, selector_key, &[labels_key])
            .ok()
            .and_then(|o| match o.get(labels_key) {
                None => Some(BTreeMap::new()),
                Some((v, p)) => labels(v, &p).ok(),
            }),
    };
    let targets = spec
        .filter(|s| s.get("targetRef").is_some() || s.get("targetRefs").is_some())
        .and_then(|s| {
            let keys = [
                "selector",
                "action",
                "rules",
                "provider",
                "targetRef",
                "targetRefs",
            ];
            Obj::new(s, "spec", &keys).ok()
        })
        .and_then(|o| super::istio::read_targets(&o, &namespace).ok())
        .unwrap_or_default();
    Some(Scope {
        namespace,
        name,
        selector,
        targets,
    })
}

/// Whether the document names waypoint targets (readable or not).
fn has_targets(value: &Value) -> bool {
    value
        .get("spec")
        .is_some_and(|s| s.get("targetRef").is_some() || s.get("targetRefs").is_some())
}

fn describe(namespace: &str, selector: &BTreeMap<String, String>) -> String {
    if selector.is_empty() {
        format!("every workload in namespace {namespace}")
    } else {
        let l: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "the workloads in namespace {namespace} labelled {}",
            l.join(",")
        )
    }
}

/// A DENY-all policy `namespace/name` (L4 and L7 forms).
fn deny_all(
    namespace: &str,
    name: &str,
    selector: BTreeMap<String, String>,
) -> (Authorization, L7Policy) {
    let l4 = Authorization {
        name: name.to_string(),
        namespace: namespace.to_string(),
        scope: if selector.is_empty() {
            PolicyScope::Namespace
        } else {
            PolicyScope::WorkloadSelector
        },
        action: PolicyAction::Deny,
        // A rule without clauses matches every connection.
        rules: vec![Rule::default()],
        selector: selector.clone(),
        has_l7_rules: false,
    };
    let l7 = L7Policy {
        name: name.to_string(),
        namespace: namespace.to_string(),
        action: PolicyAction::Deny,
        selector,
        rules: vec![L7Rule::default()],
    };
    (l4, l7)
}

/// Installs the DENY-all stand-in for a rejected AuthorizationPolicy; returns what the
/// rejection message should add (`None`: the namespace cannot be read).
fn authorization_stand_in(value: &Value, doc: usize, out: &mut Collected) -> Option<String> {
    let s = scope(value, doc, "selector", "matchLabels")?;
    let mut name = s.name;
    // A rejected duplicate keeps the first definition and gets a stand-in of its own.
    let taken = |n: &str| {
        out.policies
            .iter()
            .map(|(a, _, _)| a)
            .chain(out.attached_l4.iter().map(|(a, _, _)| a))
            .chain(out.l7.attached_policies.iter().map(|p| p.l4.as_ref()))
            .any(|a| a.namespace == s.namespace && a.name == n)
    };
    if taken(&name) {
        name = format!("{name}.rejected-document-{doc}");
    }
    let origin = Origin {
        doc,
        resource: format!("AuthorizationPolicy {}/{name}", s.namespace),
        field: String::new(),
    };
    if !s.targets.is_empty() {
        let (l4, l7) = deny_all(&s.namespace, &name, BTreeMap::new());
        let what: Vec<String> = s
            .targets
            .iter()
            .map(|t| match t {
                PolicyTarget::Gateway { name, .. } => format!("waypoint {name}"),
                PolicyTarget::Service { name, .. } => format!("service {name}"),
            })
            .collect();
        out.l7.attached_policies.push(Arc::new(AttachedPolicy {
            targets: s.targets,
            l7: Arc::new(l7),
            l4: Arc::new(l4),
        }));
        return Some(format!(
            "fail-closed: until it is fixed, every request through {} is denied",
            what.join(", ")
        ));
    }
    // Unreadable targets or selector: the whole namespace.
    let selector = match (&s.selector, has_targets(value)) {
        (Some(sel), false) => sel.clone(),
        _ => BTreeMap::new(),
    };
    let scope_text = describe(&s.namespace, &selector);
    let (l4, l7) = deny_all(&s.namespace, &name, selector);
    out.policies.push((l4, origin, true));
    out.l7.authorization_policies.push(Arc::new(l7));
    Some(format!(
        "fail-closed: until it is fixed, a DENY-all stand-in applies to {scope_text}"
    ))
}

/// Records a rejected Kubernetes-style document and installs its stand-in. Returns the error
/// for the whole file when the resource guards something whose scope cannot be read.
#[allow(clippy::too_many_arguments)]
pub(super) fn reject(
    doc: &Document,
    group: &str,
    kind: &str,
    value: &Value,
    source: &str,
    resource: Option<String>,
    error: FieldError,
    out: &mut Collected,
) -> Result<(), ConfigError> {
    let mut e = ConfigError {
        file: source.to_string(),
        document: Some(doc.index),
        resource: resource.or_else(|| Some(kind.to_string())),
        field: Some(error.field).filter(|f| !f.is_empty()),
        message: error.message,
    };
    let stand_in = match (group, kind) {
        ("security.istio.io", "AuthorizationPolicy") => {
            match authorization_stand_in(value, doc.index, out) {
                Some(s) => Some(s),
                None => return Err(unreadable(e)),
            }
        }
        ("security.istio.io", "PeerAuthentication") => {
            let Some(s) = scope(value, doc.index, "selector", "matchLabels") else {
                return Err(unreadable(e));
            };
            let selector = s.selector.unwrap_or_default();
            let text = describe(&s.namespace, &selector);
            out.peer_authentications.push(PeerAuthentication {
                name: s.name,
                namespace: s.namespace,
                selector,
                mode: Some(MtlsMode::Strict),
                port_level: BTreeMap::new(),
            });
            Some(format!(
                "fail-closed: until it is fixed, mTLS is STRICT for {text}"
            ))
        }
        ("networking.istio.io", "Sidecar") => {
            let Some(s) = scope(value, doc.index, "workloadSelector", "labels") else {
                return Err(unreadable(e));
            };
            let selector = s.selector.unwrap_or_default();
            let text = describe(&s.namespace, &selector);
            let scope = SidecarScope {
                name: s.name,
                namespace: s.namespace,
                selector,
                outbound_traffic_policy: OutboundTrafficMode::RegistryOnly,
                // `~/*` names no namespace: nothing is allowed out.
                egress: vec![EgressListener {
                    port: None,
                    hosts: vec!["~/*".to_string()],
                }],
            };
            out.sidecars.push((scope, true));
            Some(format!(
                "fail-closed: until it is fixed, no outbound traffic is allowed for {text}"
            ))
        }
        _ => None,
    };
    if let Some(s) = stand_in {
        e.message = format!("{}; {s}", e.message);
    }
    out.rejected.push(e);
    Ok(())
}

fn unreadable(mut e: ConfigError) -> ConfigError {
    e.message = format!(
        "{} (a security resource whose namespace cannot be read cannot be replaced by a fail-closed \
         stand-in, so the whole file is rejected)",
        e.message
    );
    e
}

#[cfg(test)]
#[path = "reject_tests.rs"]
mod tests;
